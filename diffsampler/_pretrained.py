"""Save / load of the project's small networks (classifiers) as a directory with `config.json` and
`model.safetensors`.  (diffusers' ModelMixin does the same for registered diffusers models; these
small torch modules keep a plain JSON config, so the packaged assets load without diffusers' config
machinery.)"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["SafetensorsModule"]


class SafetensorsModule:
    """Mixin for a torch module with a JSON-serialisable `self.config`; subclasses implement
    `_from_config(cfg)` and may set `_MISSING_HINT` (how to produce a missing directory)."""

    CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
    _MISSING_HINT = ""

    def save_pretrained(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / self.CONFIG_NAME).write_text(json.dumps(self.config, indent=2) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(directory / self.WEIGHTS_NAME))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path):
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (cls.CONFIG_NAME, cls.WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"no {name} in {directory}{cls._MISSING_HINT}")
        model = cls._from_config(json.loads((directory / cls.CONFIG_NAME).read_text()))
        model.load_state_dict(load_file(str(directory / cls.WEIGHTS_NAME)))
        return model.eval()

    @classmethod
    def _from_config(cls, cfg: dict):
        raise NotImplementedError
