"""fedfm: federated fine-tuning of foundation models on data that never leaves its owner.

``import fedfm`` gives the Python API (``fedfm.api``): ``builtin_configs``, ``load_config``, ``run``, ``resume``, ``report``,
``export``, ``generate``, ``privacy_guarantee``, ``sweep``; docs/python-api.md shows them in use. Importing fedfm loads no model
and no torch.
"""

__version__ = "0.1.0"

# The API's names are not the names of fedfm's modules (importing a submodule binds its name on this package, which
# would hide a function of the same name): tests/test_python_api.py checks it.

from .api import (RunResult, builtin_configs, export, generate, load_config, privacy_guarantee, report, resume,  # noqa: E402
                  run, sweep)
from .errors import ConfigError, DataError, FedfmError  # noqa: E402

__all__ = ["ConfigError", "DataError", "FedfmError", "RunResult", "builtin_configs", "export", "generate", "load_config",
           "privacy_guarantee", "report", "resume", "run", "sweep", "__version__"]
