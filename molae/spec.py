"""The `molae` section of a converted or trained checkpoint's config.json, typed: what is written there is a
`MolaeSpec.to_dict()`, and everything that reads it goes through `MolaeSpec.from_dict`, which checks it.

    molae = {"version": 1,
             "base_model_type": "qwen2_moe",                 # the family (molae_<family> is the model type)
             "layers": {"3": {"latent": {"gate": 32, "up": 32}, "groups": 1[, "permuted": true]}
                        | {"latent_moe": 256}},              # MoLAE experts, or LatentMoE's routed path
             "source_layout": {"3": {"layout": "per_expert" | "fused", "names": {kind: tensor name}}},
             "options": {...},                               # how it was made (convert's options), or
             "trained": {...}}                               # the training run that made it
A layer with "latent": {} is our standard experts module (a standard MoE trained by molae).
"""

from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("gate", "up", "down")


@dataclass
class LayerSpec:
    latent: dict[str, int] = field(default_factory=dict)  # d per factorized kind; {}: whole experts
    groups: int = 1
    permuted: bool = False  # groups by similarity: tensors in slot order, an expert_slot map
    latent_moe: int | None = None  # LatentMoE's routed path instead

    def to_dict(self) -> dict:
        if self.latent_moe is not None:
            return {"latent_moe": self.latent_moe}
        return dict(latent=dict(self.latent), groups=self.groups, **({"permuted": True} if self.permuted else {}))

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "LayerSpec":
        unknown = set(d) - {"latent", "groups", "permuted", "latent_moe"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)} in a molae layer entry")
        if "latent_moe" in d:
            return cls(latent_moe=int(d["latent_moe"]))
        latent = d.get("latent", {})
        if not isinstance(latent, dict) or set(latent) - set(KINDS) or \
                not all(isinstance(v, int) and v > 0 for v in latent.values()):
            raise ValueError(f"{where}: latent {latent!r} is not a map of {'/'.join(KINDS)} to positive sizes")
        groups = d.get("groups", 1)
        if not isinstance(groups, int) or groups < 1:
            raise ValueError(f"{where}: groups {groups!r} is not a positive integer")
        return cls(latent={k: latent[k] for k in KINDS if k in latent}, groups=groups,
                   permuted=bool(d.get("permuted", False)))


@dataclass
class MolaeSpec:
    base_model_type: str
    layers: dict[str, LayerSpec]
    source_layout: dict[str, dict] = field(default_factory=dict)
    options: dict | None = None
    trained: dict | None = None
    version: int = 1

    def to_dict(self) -> dict:
        out = dict(version=self.version, base_model_type=self.base_model_type,
                   layers={k: v.to_dict() for k, v in self.layers.items()})
        for name in ("options", "source_layout", "trained"):
            value = getattr(self, name)
            if value:
                out[name] = value
        return out

    @classmethod
    def from_dict(cls, d, where: str = "config.json") -> "MolaeSpec":
        if not isinstance(d, dict) or "layers" not in d or "base_model_type" not in d:
            raise ValueError(f"{where} is not a MoLAE checkpoint: its config.json has no molae section with "
                             "base_model_type and layers (molae convert and molae train write one)")
        if d.get("version", 1) != 1:
            raise ValueError(f"{where}: molae section version {d['version']} is newer than this molae reads: "
                             "upgrade molae")
        layers = {str(k): LayerSpec.from_dict(v, f"{where} molae.layers[{k}]") for k, v in d["layers"].items()}
        return cls(d["base_model_type"], layers, d.get("source_layout") or {}, d.get("options"), d.get("trained"),
                   d.get("version", 1))


__all__ = ["LayerSpec", "MolaeSpec"]
