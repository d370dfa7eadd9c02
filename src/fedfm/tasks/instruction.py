"""Instruction tuning of causal LMs (FedIT, Zhang et al. 2024): the loss covers only the assistant's response tokens.

A conversation is rendered with the tokenizer's chat template when it has one (else an Alpaca-style layout), the
character spans of the assistant turns are mapped onto tokens through the tokenizer's offsets, and every other token
is masked out of the loss (label -100). Evaluation adds greedy answers to a fixed sample of held-out prompts, scored by
exact match and ROUGE-L (Lin 2004, via ``rouge-score``) against every answer the data gives to the same prompt.
"""
from __future__ import annotations

import math
import re
import string
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from . import TASKS, _need_tokenizer, _pad_rows
from .causal import CausalLM

SHORT_ANSWER_WORDS = 3  # exact match means something only where an answer is this short (after normalisation)
FALLBACK_HEADERS = {"system": "", "user": "### Instruction:\n", "assistant": "### Response:\n"}


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation for exact match: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


@TASKS.register("instruction")
class InstructionTuning(CausalLM):
    """Supervised instruction tuning on conversations (Alpaca, chat ``messages`` or prompt/completion rows)."""

    reads_chat = True
    cached_attrs = ("questions", "prompts", "answers", "notes")

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.prompts: list[str] = []
        self.answers: list[str] = []
        self.questions: list[str] = []
        self.notes: list[str] = []

    # ------------------------------------------------------------------ rendering
    def _conversation(self, conv: list[dict]) -> list[dict]:
        sp = self.cfg.task.system_prompt
        if sp and conv[0]["role"] != "system":
            return [{"role": "system", "content": sp}] + conv
        return conv

    def _template(self, messages: list[dict], generation_prompt: bool) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        eos = tok.eos_token or ""
        text = ""
        for m in messages:
            text += FALLBACK_HEADERS[m["role"]] + m["content"] + (eos if m["role"] == "assistant" else "") + "\n\n"
        return text + (FALLBACK_HEADERS["assistant"] if generation_prompt else "")

    def prompt_for(self, question: str) -> str:
        """A user question rendered as the model is trained to see it, ready for the answer."""
        return self._template(self._conversation([{"role": "user", "content": question}]), True)

    def render(self, conv: list[dict]) -> tuple[str, list[tuple[int, int]], str, str]:
        """(full text, character spans of the assistant turns, prompt for the last answer, the last answer)."""
        conv = self._conversation(conv)
        full = self._template(conv, False)
        spans, prompt = [], ""
        for i, m in enumerate(conv):
            if m["role"] != "assistant":
                continue
            prompt = self._template(conv[:i], True)
            through = self._template(conv[: i + 1], False)
            if not (full.startswith(through) and through.startswith(prompt)):
                raise ValueError("the chat template does not render a conversation as a prefix of its continuation; "
                                 "the response tokens cannot be located")
            spans.append((len(prompt), len(through)))
        return full, spans, prompt, conv[-1]["content"]

    # ------------------------------------------------------------------ encoding
    def encode(self, examples) -> dict[str, torch.Tensor]:
        _need_tokenizer(self.tokenizer)
        L = self.cfg.task.max_length
        rendered = [self.render(c) for c in examples.messages]
        texts = [r[0] for r in rendered]
        tok = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=L,
                             return_offsets_mapping=True)
        ids, mask, lengths = _pad_rows(tok["input_ids"], self.tokenizer.pad_token_id or 0)
        labels = torch.full_like(ids, -100)
        for i, (offsets, (_, spans, _, _)) in enumerate(zip(tok["offset_mapping"], rendered)):
            starts = np.array([o[0] for o in offsets], dtype=np.int64)
            ends = np.array([o[1] for o in offsets], dtype=np.int64)
            is_resp = np.zeros(len(offsets), dtype=bool)
            for a, b in spans:
                is_resp |= (starts >= a) & (starts < b) & (ends > starts)
            sel = torch.as_tensor(np.flatnonzero(is_resp))
            labels[i, sel] = ids[i, sel]
        self.questions = [next((m["content"] for m in reversed(c[:-1]) if m["role"] == "user"), "")
                          for c in examples.messages]
        self.prompts = [r[2] for r in rendered]
        self.answers = [r[3] for r in rendered]
        n_trunc = int(sum(len(r) >= L for r in tok["input_ids"]))
        n_empty = int(((labels != -100).sum(1) == 0).sum())
        self.notes = []
        if n_trunc:
            self.notes.append(f"{n_trunc} of {len(texts)} conversations were cut at task.max_length={L} tokens"
                              + (f"; {n_empty} kept no response token and add nothing to the loss" if n_empty else ""))
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "lengths": lengths}

    def batches(self, enc, indices, batch_size, generator=None) -> Iterator[dict[str, torch.Tensor]]:
        """Training batches are packed when ``task.packing`` is on (rows of exactly max_length tokens, examples
        concatenated in shuffled order; a packed example may attend to the one before it, as in GPT pre-training).
        Evaluation batches are never packed."""
        if not (self.cfg.task.packing and generator is not None):
            yield from super().batches(enc, indices, batch_size, generator)
            return
        idx = torch.as_tensor(self.rows(enc, indices))
        idx = idx[torch.randperm(len(idx), generator=generator)]
        if len(idx) == 0:
            return
        lens = enc["lengths"][idx]
        ids = torch.cat([enc["input_ids"][r, :n] for r, n in zip(idx.tolist(), lens.tolist())])
        lab = torch.cat([enc["labels"][r, :n] for r, n in zip(idx.tolist(), lens.tolist())])
        L = self.cfg.task.max_length
        rows = math.ceil(len(ids) / L)
        pad = rows * L - len(ids)
        mask = torch.cat([torch.ones(len(ids), dtype=torch.long), torch.zeros(pad, dtype=torch.long)]).view(rows, L)
        ids = F.pad(ids, (0, pad), value=self.tokenizer.pad_token_id or 0).view(rows, L)
        lab = F.pad(lab, (0, pad), value=-100).view(rows, L)
        for i in range(0, rows, batch_size):
            yield {"input_ids": ids[i:i + batch_size].to(self.device),
                   "attention_mask": mask[i:i + batch_size].to(self.device),
                   "labels": lab[i:i + batch_size].to(self.device)}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def generate(self, model, indices: np.ndarray, pool: np.ndarray | None = None
                 ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Greedy answers to the prompts of ``indices``; mean exact match and ROUGE-L F1 (best over references), and
        exact match over the prompts whose shortest reference has at most ``SHORT_ANSWER_WORDS`` words
        (``exact_match_short``, ``short_answers`` of them), where an exact answer can be expected.

        A prompt's references are the answers to it among ``pool`` (the held-out set; default ``indices``) only,
        so that no answer seen in training is a reference, whatever split the data came with."""
        from rouge_score import rouge_scorer

        gcfg = self.cfg.eval.generation
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        records = []
        # batches of similar length waste less on padding; prompts longer than training rows keep their end
        held: dict[str, list[str]] = {}
        for k in (indices if pool is None else pool):
            held.setdefault(self.prompts[int(k)], []).append(self.answers[int(k)])
        order = sorted((int(j) for j in indices), key=lambda j: len(self.prompts[j]))
        for i in range(0, len(order), gcfg.batch_size):
            chunk = order[i:i + gcfg.batch_size]
            answers = generate_text(model, self.tokenizer, [self.prompts[j] for j in chunk], gcfg.max_new_tokens,
                                    self.device, self.autocast, max_prompt_tokens=self.cfg.task.max_length)
            for j, answer in zip(chunk, answers):
                refs = held.get(self.prompts[j], [self.answers[j]])
                em = max(float(normalize_answer(answer) == normalize_answer(r)) for r in refs)
                rl = max(scorer.score(r, answer)["rougeL"].fmeasure for r in refs)
                short = min(len(normalize_answer(r).split()) for r in refs) <= SHORT_ANSWER_WORDS
                records.append({"example": j, "question": self.questions[j], "prompt": self.prompts[j], "reference": self.answers[j],
                                "num_references": len(refs), "generation": answer, "exact_match": em, "rougeL": rl,
                                "short_answer": short})
        if not records:
            return {}, []
        records.sort(key=lambda r: r["example"])
        metrics = {"exact_match": float(np.mean([r["exact_match"] for r in records])),
                   "rougeL": float(np.mean([r["rougeL"] for r in records]))}
        short = [r["exact_match"] for r in records if r["short_answer"]]
        if short:  # exact match over the prompts with a short answer (a reference of at most 3 words)
            metrics["exact_match_short"] = float(np.mean(short))
            metrics["short_answers"] = len(short)
        return metrics, records


def generate_text(model, tokenizer, prompts: list[str], max_new_tokens: int, device=None, autocast=None,
                  max_prompt_tokens: int | None = None) -> list[str]:
    """Greedy decoding of rendered prompts, left-padded into one batch; the answers without special tokens.

    ``max_prompt_tokens`` keeps only the end of a longer prompt (the latest turns and the answer header).
    """
    import contextlib

    device = device or next(model.parameters()).device
    sides = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    try:
        enc = tokenizer(prompts, add_special_tokens=False, return_tensors="pt", padding=True,
                        truncation=max_prompt_tokens is not None, max_length=max_prompt_tokens,
                        return_token_type_ids=False).to(device)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides
    was_training = model.training
    model.eval()
    with (autocast() if autocast else contextlib.nullcontext()):
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model.train(was_training)
    new = out[:, enc["input_ids"].shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
