"""A model resolved and checked, before anything runs it: its files, config, trunk weights and MoE layers.

`Model.load` is what opening a model means (a converted model directory, checked on load, or a plain
GGUF): the manifest, the trunk's tensors mapped, the hyper-parameters read as llama.cpp reads them,
the MoE layers found and checked against the metadata. An Engine (KV cache, compute, experts) runs a
Model; several engines may run one (the shadow predictors' engines share the main model's pieces).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from edgemoe.errors import UserError
from edgemoe.format.arch import has_shared_expert
from edgemoe.format.manifest import TRUNK_NAME, Manifest, check_file_hash, check_model_files, load_manifest
from edgemoe.format.schema import T, tensor_name
from edgemoe.model.config import ModelConfig
from edgemoe.model.weights import GGUFTensors


def resolve_model(path: str | Path) -> tuple[Path, Manifest | None]:
    """(trunk GGUF, manifest or None) for a converted model directory or a plain dense GGUF.

    A model directory is checked on load: every file present with its size, the trunk's sha256;
    expert shards are hashed when first used (see LocalExperts).
    """
    p = Path(path)
    if p.is_dir():
        manifest = load_manifest(p)
        check_model_files(p, manifest)
        check_file_hash(p, manifest, TRUNK_NAME)
        return p / TRUNK_NAME, manifest
    if p.is_file():
        return p, None
    raise UserError(f"{p}: no such model directory or GGUF file")


@dataclass(frozen=True)
class Model:
    """What an engine runs: the model directory (None for a plain GGUF) and its manifest, the trunk's
    tensors, the config, the MoE layers. owns_weights: close() unmaps the trunk (a Model made over
    tensors someone else mapped leaves them open)."""

    model_dir: Path | None
    manifest: Manifest | None
    weights: GGUFTensors
    cfg: ModelConfig
    moe_layers: list[int]
    owns_weights: bool = True

    @classmethod
    def load(cls, path: str | Path, weights: GGUFTensors | None = None) -> "Model":
        """Open a converted model directory or a GGUF. weights: trunk tensors already mapped (a shadow
        trunk of the same model directory): used instead of its trunk, and left open on close()."""
        if weights is None:
            trunk_path, manifest = resolve_model(path)
            weights = GGUFTensors(trunk_path)
            owns = True
        else:
            manifest = load_manifest(path) if Path(path).is_dir() else None
            owns = False
        try:
            return cls._checked(Path(path) if manifest is not None else None, manifest, weights, owns)
        except BaseException:
            if owns:
                weights.close()
            raise

    def with_trunk(self, weights: GGUFTensors) -> "Model":
        """The same model directory over another trunk of it (a requantized shadow trunk), checked like
        any trunk; its tensors are left open on close()."""
        return self._checked(self.model_dir, self.manifest, weights, False)

    def shared(self) -> "Model":
        """This model for another engine to run: the same pieces, none of them closed by it."""
        return replace(self, owns_weights=False)

    @classmethod
    def _checked(cls, model_dir: Path | None, manifest: Manifest | None, weights: GGUFTensors, owns: bool) -> "Model":
        cfg = ModelConfig.from_metadata(weights.meta, weights.path)
        moe_layers = [il for il in range(cfg.n_layer) if tensor_name(T.FFN_GATE_INP, il) in weights]
        if moe_layers and not cfg.shared_expert and has_shared_expert(weights.names()):
            raise UserError(f"{weights.path}: shared-expert tensors (ffn_*_shexp) but no "
                            f"{cfg.arch}.expert_shared_feed_forward_length: llama.cpp would not load it either")
        rule = cfg.rule_moe_layers()
        if rule is not None and rule != moe_layers:  # the graph llama.cpp builds would not match the tensors
            raise UserError(f"{weights.path}: {cfg.arch} metadata makes layers {rule} MoE layers "
                            f"(leading_dense_block_count, interleave_moe_layer_step), its tensors {moe_layers}")
        return cls(model_dir, manifest, weights, cfg, moe_layers, owns)

    @property
    def trunk_path(self) -> Path:
        return Path(self.weights.path)

    def close(self) -> None:
        if self.owns_weights:
            self.weights.close()
