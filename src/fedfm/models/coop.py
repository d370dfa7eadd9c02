"""CoOp's prompted CLIP (Zhou et al. 2022, "Learning to Prompt for Vision-Language Models"): a frozen CLIP and M
learnable context vectors [V]_1..[V]_M, shared by every class, that stand in front of each class name.

The prompt of class c is ``[SOS] [V]_1 .. [V]_M [tokens of the name of c] . [EOS]``: its token embeddings with the
context vectors put in place of M placeholder tokens, pushed through CLIP's own (frozen) text transformer, pooled at
[EOS] and projected: the text feature w_c. An image's feature f comes from CLIP's frozen image tower, and

    p(y = c | x) = exp(s · cos(f, w_c)) / Σ_j exp(s · cos(f, w_j)),    s = exp(CLIP's logit_scale).

Only the context vectors are trained (and, federated as in PromptFL, Guo et al. 2023, only they travel).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

CLIP_PARTS = ("text_model.embeddings.token_embedding", "text_model.encoder", "text_model.final_layer_norm",
              "text_projection", "vision_model", "visual_projection", "logit_scale")


def missing_parts(model) -> list[str]:
    """What of CLIP's layout (``CLIPModel``: text transformer, projections, logit scale) ``model`` lacks."""
    out = []
    for name in CLIP_PARTS:
        obj = model
        for part in name.split("."):
            obj = getattr(obj, part, None)
        if obj is None:
            out.append(name)
    return out


def causal_mask(batch: int, length: int, dtype: torch.dtype, device) -> torch.Tensor:
    """CLIP's causal attention mask, [batch, 1, length, length]: 0 on and below the diagonal, the dtype's min above."""
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    return mask[None, None].expand(batch, 1, length, length)


def text_features_from_embeds(clip, inputs_embeds: torch.Tensor, eos_positions: torch.Tensor) -> torch.Tensor:
    """CLIP's text features from token embeddings instead of token ids: what ``CLIPModel.get_text_features`` computes
    (``CLIPTextTransformer.forward``: position embeddings added, the causal encoder, the final layer norm, the hidden
    state at each row's [EOS], the text projection). No padding mask is needed: under the causal mask [EOS] sees
    only the tokens before it, never the padding after it."""
    text = clip.text_model
    hidden = text.embeddings(inputs_embeds=inputs_embeds)
    b, t = hidden.shape[:2]
    hidden = text.encoder(inputs_embeds=hidden, causal_attention_mask=causal_mask(b, t, hidden.dtype, hidden.device))
    hidden = text.final_layer_norm(hidden.last_hidden_state)
    pooled = hidden[torch.arange(b, device=hidden.device), eos_positions.to(hidden.device)]
    return clip.text_projection(pooled)


class ContextVectors(torch.nn.Module):
    """[V]_1..[V]_M: the one trainable tensor, [M, width], in a module of its own (no buffers, never called: per-example
    gradients under DP-SGD are taken one example at a time, ``privacy.dpsgd.one_at_a_time``)."""

    def __init__(self, num_context: int, width: int, device=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(num_context, width, device=device))


class PromptedCLIP(torch.nn.Module):
    """The frozen CLIP ``clip`` and CoOp's context ``context`` ([M, width], the only trainable parameter).

    ``set_prompts`` gives it the classes' prompt token ids (from the task, which holds the tokenizer and the class
    names); ``forward(image_features)`` is the logits over the classes. CLIP stays in eval mode (frozen encoders, no
    dropout), so an image's feature never changes and can be computed once.
    """

    def __init__(self, clip, num_context: int):
        super().__init__()
        missing = missing_parts(clip)
        if missing:
            raise ValueError(f"adapter.method 'coop': the model ({type(clip).__name__}) is not a CLIP-style dual "
                             f"encoder; it has no {', '.join(missing)}")
        for p in clip.parameters():
            p.requires_grad_(False)
        self.clip = clip.eval()
        embedding = clip.text_model.embeddings.token_embedding
        # its values are set by the task once the prompts are known (ClipPrompt.prepare_model): a phrase's token
        # embeddings (adapter.context_init) or N(0, 0.02)
        device = embedding.weight.device
        self.context_vectors = ContextVectors(num_context, embedding.embedding_dim, device)
        # the class prompts (set_prompts), kept on the context's device
        self.prompt_ids = torch.zeros(0, num_context + 2, dtype=torch.long, device=device)
        self.eos_positions = torch.zeros(0, dtype=torch.long, device=device)
        self.class_names: list[str] = []

    @property
    def config(self):
        return self.clip.config

    @property
    def context(self) -> torch.nn.Parameter:
        return self.context_vectors.weight

    @property
    def num_context(self) -> int:
        return self.context.shape[0]

    def train(self, mode: bool = True) -> "PromptedCLIP":
        super().train(mode)
        self.clip.eval()  # frozen: CoOp trains the context only, with CLIP as it is at inference
        return self

    def set_prompts(self, prompt_ids: torch.Tensor, eos_positions: torch.Tensor, class_names: list[str]) -> None:
        """The prompt of each class: token ids ``[SOS] X .. X name . [EOS] pad..`` (rows padded after [EOS]) with the
        M placeholders at positions 1..M, and the position of each row's [EOS]."""
        limit = self.clip.text_model.embeddings.position_embedding.num_embeddings
        if prompt_ids.shape[1] > limit:
            raise ValueError(f"a class prompt is {prompt_ids.shape[1]} tokens long; the text model reads at most {limit}")
        device = self.context.device
        self.prompt_ids, self.eos_positions = prompt_ids.to(device), eos_positions.to(device)
        self.class_names = list(class_names)

    @torch.no_grad()
    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        return self.clip.text_model.embeddings.token_embedding(ids.to(self.context.device))

    def prompt_embeddings(self) -> torch.Tensor:
        """[K, T, width]: each class's prompt embeddings with [V]_1..[V]_M in place of the placeholders."""
        if not len(self.prompt_ids):
            raise RuntimeError("PromptedCLIP: no class prompts (set_prompts was not called)")
        tokens = self.clip.text_model.embeddings.token_embedding(self.prompt_ids.to(self.context.device))  # frozen
        m = self.num_context
        ctx = self.context.to(tokens.dtype).unsqueeze(0).expand(len(tokens), -1, -1)
        return torch.cat([tokens[:, :1], ctx, tokens[:, 1 + m:]], dim=1)

    def text_features(self) -> torch.Tensor:
        """w_c for every class c, [K, projection_dim]."""
        return text_features_from_embeds(self.clip, self.prompt_embeddings(), self.eos_positions)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """f for each image, [B, projection_dim] (CLIP's frozen image tower)."""
        return self.clip.get_image_features(pixel_values=pixel_values)

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """s · cos(f, w_c), [B, K]."""
        scale = self.clip.logit_scale.exp()
        return scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).t()

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.logits(image_features, self.text_features())

    def save_pretrained(self, path: str) -> None:
        """The learned context (``coop_context.safetensors``) and what it is for (``coop_config.json``: the class
        names, M, the base's config); the base itself is the unchanged CLIP."""
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        save_file({"context": self.context.detach().cpu().contiguous()}, str(out / "coop_context.safetensors"))
        meta = {"method": "coop", "num_context": self.num_context, "class_names": self.class_names,
                "base_model_type": getattr(self.clip.config, "model_type", None),
                "base_name_or_path": getattr(self.clip.config, "_name_or_path", None) or None}
        tmp = out / f".coop_config.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, out / "coop_config.json")

    @torch.no_grad()
    def load_context(self, path: str) -> None:
        """The context ``save_pretrained`` wrote into ``path`` (a run's ``model/``), checked against this model's M,
        width and class names."""
        from safetensors.torch import load_file

        folder = Path(path)
        meta = json.loads((folder / "coop_config.json").read_text())
        context = load_file(str(folder / "coop_context.safetensors"))["context"]
        if tuple(context.shape) != tuple(self.context.shape):
            raise ValueError(f"{folder}: a context of shape {tuple(context.shape)}; this model's is "
                             f"{tuple(self.context.shape)}")
        if self.class_names and meta.get("class_names") and meta["class_names"] != self.class_names:
            raise ValueError(f"{folder}: learned for the classes {meta['class_names']}, not {self.class_names}")
        self.context.copy_(context)
