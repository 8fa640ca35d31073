"""LoRA adapters on the in-process reader (peft): DRO's optional generator update trains one,
the transformers backend serves one (``GAINRAG_LLM__LORA_ADAPTER``).

The adapter is injected into the model in place, so the generator and its teacher-forced scorer,
which share the model, both see it: the E-step after a generator update scores with the updated
reader. Saved in peft's own format (``adapter_config.json`` + ``adapter_model.safetensors``), so
``PeftModel.from_pretrained`` or any peft-aware server loads it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gainrag.errors import ConfigurationError

ADAPTER_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraSpec:
    """Rank, scale and target projections of a LoRA adapter (the attention projections of the
    Llama/Qwen families by default, as in most LoRA fine-tunes)."""

    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha < 1 or not self.targets:
            raise ValueError(f"LoRA needs rank >= 1, alpha >= 1 and target modules: {self}")


class LoraAdapter:
    """A trainable LoRA adapter injected into ``model`` (the base weights are frozen)."""

    def __init__(self, model: torch.nn.Module, spec: LoraSpec) -> None:
        from peft import LoraConfig, get_peft_model

        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in spec.targets if t not in names]
        if missing:
            raise ConfigurationError(f"the model has no modules named {missing} for LoRA")
        self.spec = spec
        config = LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            target_modules=list(spec.targets),
            # no dropout: the E-step must score with the same adapter the M-step trained
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        # fp32 adapter weights even on a bf16 base (autocast_adapter_dtype): a bf16 update of
        # size lr * grad would mostly round away.
        self._peft = get_peft_model(model, config, autocast_adapter_dtype=True)

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable (LoRA) parameters."""
        return [p for p in self._peft.parameters() if p.requires_grad]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's weights alone (for a resumable checkpoint)."""
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self._peft).items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore weights from :meth:`state_dict`; every adapter weight must be present."""
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self._peft, state)
        lost = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        if lost:
            raise ValueError(f"the adapter state lacks {lost[:3]}")

    def fingerprint(self) -> str:
        """A short hash of the adapter's weights (for versions: they change the answers)."""
        h = hashlib.sha256()
        for name, value in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(value.float().cpu().numpy().tobytes())
        return h.hexdigest()[:12]

    def save(self, directory: Path) -> None:
        """Write the adapter in peft's format (without peft's placeholder model card)."""
        self._peft.save_pretrained(str(directory))
        (directory / "README.md").unlink(missing_ok=True)

    def describe(self) -> dict[str, Any]:
        """What a training record says about the adapter."""
        return {
            "rank": self.spec.rank,
            "alpha": self.spec.alpha,
            "targets": list(self.spec.targets),
            "trainable_parameters": sum(p.numel() for p in self.parameters()),
        }


def adapter_version(directory: Path) -> str:
    """A short hash of a saved adapter's weights file (part of the generator's version)."""
    path = directory / ADAPTER_FILE
    if not (directory / "adapter_config.json").is_file() or not path.is_file():
        raise ConfigurationError(
            f"no LoRA adapter at {directory} (needs adapter_config.json and {ADAPTER_FILE})",
            code="lora_adapter_missing",
        )
    return hashlib.sha256(path.read_bytes()).hexdigest()[:8]


def version_suffix(directory: Path) -> str:
    """What a served generator's version gains with the adapter at ``directory`` merged in
    (``+lora-<hash of the weights file>``); training records write the same string, so a served
    version can be looked up in the record that made it."""
    return f"+lora-{adapter_version(directory)}"


def merge_adapter(model: torch.nn.Module, directory: Path) -> Any:
    """``model`` with the adapter at ``directory`` merged into its weights (serving pays no
    LoRA matmuls; the merge is exact up to the base dtype's rounding)."""
    from peft import PeftModel

    adapter_version(directory)  # a clear error before peft's
    return PeftModel.from_pretrained(model, str(directory)).merge_and_unload()


def targets_from(text: str) -> tuple[str, ...]:
    """``"q_proj,v_proj"`` (a CLI value) as a tuple of module names."""
    return tuple(t.strip() for t in text.split(",") if t.strip())
