"""Inspect a source GGUF and decide what goes where; every check on the input happens here."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.gguf_reader import ReaderTensor

from edgemoe.errors import UserError
from edgemoe.format.arch import ARCHITECTURES, MoeArch, interleaved_moe_layers
from edgemoe.format.schema import parse_expert_tensor
from edgemoe.format.gguf_io import get_int, get_str, open_gguf, tensor_ne
from edgemoe.format.imatrix import Imatrix, read_imatrix
from edgemoe.format.manifest import TRUNK_NAME, expert_file_name, sha256_file, shadow_file_name, shadow_trunk_file_name
from edgemoe.format.schema import expert_tensor_name
from edgemoe.convert import requant


@dataclass
class StackedExpertTensor:
    """One `blk.L.ffn_<part>_exps.<kind>` tensor; expert e is bytes [e*slice_nbytes, (e+1)*slice_nbytes)."""

    name: str
    layer: int
    part: str
    kind: str
    tensor: ReaderTensor
    ne: tuple[int, ...]
    ggml_type: GGMLQuantizationType

    @property
    def slice_nbytes(self) -> int:
        return int(self.tensor.n_bytes) // self.ne[-1]

    @property
    def slice_ne(self) -> tuple[int, ...]:
        return self.ne[:-1]


@dataclass
class ConversionPlan:
    src: Path
    reader: GGUFReader
    arch: MoeArch
    name: str
    n_layers: int
    n_experts: int
    n_experts_used: int
    trunk_tensors: list[ReaderTensor]
    experts: dict[int, list[StackedExpertTensor]] = field(default_factory=dict)  # layer -> its stacked tensors
    shadow_type: GGMLQuantizationType | None = None  # routed experts requantized into shadow-<type>.gguf
    shadow_trunk_type: GGMLQuantizationType | None = None  # the trunk requantized into shadow-trunk-<type>.gguf
    shadow_fallback_type: GGMLQuantizationType | None = None  # for expert tensors whose rows shadow_type cannot take
    shadow_imatrix: Imatrix | None = None  # column importance for the shadow's requantization
    shadow_imatrix_sha256: str | None = None

    def shadow_type_of(self, st: "StackedExpertTensor") -> GGMLQuantizationType:
        """The shadow type of one stacked expert weight: shadow_type, or the fallback where its rows don't fit."""
        assert self.shadow_type is not None
        if self.shadow_fallback_type is not None and not requant.fits(st.ne[0], self.shadow_type):
            return self.shadow_fallback_type
        return self.shadow_type

    @property
    def shadow_fallback_used(self) -> bool:
        return any(self.shadow_type_of(t) != self.shadow_type for t in self.stacked_tensors() if t.kind == "weight")

    def shadow_importance(self, st: "StackedExpertTensor") -> list[np.ndarray | None] | None:
        """Per-expert column weights of a stacked expert weight for the shadow (None: unweighted)."""
        if self.shadow_imatrix is None:
            return None
        return [self.shadow_imatrix.weights(st.name, e) for e in range(self.n_experts)]

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self.experts)

    @property
    def expert_parts(self) -> list[str]:
        first = self.experts[self.moe_layers[0]]
        return [t.part for t in first if t.kind == "weight"]

    def trunk_nbytes(self) -> int:
        return sum(int(t.n_bytes) for t in self.trunk_tensors)

    def expert_nbytes(self, layer: int) -> int:
        return sum(t.slice_nbytes for t in self.experts[layer])

    def stacked_tensors(self) -> list[StackedExpertTensor]:
        return [t for layer in self.moe_layers for t in self.experts[layer]]

    def shadow_nbytes(self) -> int:
        assert self.shadow_type is not None
        return sum(requant.requantized_nbytes(t.tensor, self.shadow_type_of(t)) if t.kind == "weight" else int(t.tensor.n_bytes)
                   for t in self.stacked_tensors())

    def shadow_trunk_nbytes(self) -> int:
        assert self.shadow_trunk_type is not None
        return sum(requant.requantized_nbytes(t, self.shadow_trunk_type) if requantize_in_trunk(t) else int(t.n_bytes)
                   for t in self.trunk_tensors)

    def files(self) -> list[tuple[str, int]]:
        """(relative path, tensor bytes) of every file to write."""
        out = [(TRUNK_NAME, self.trunk_nbytes())]
        for layer in self.moe_layers:
            size = self.expert_nbytes(layer)
            out.extend((expert_file_name(layer, e), size) for e in range(self.n_experts))
        if self.shadow_type is not None:
            out.append((shadow_file_name(requant.type_name(self.shadow_type)), self.shadow_nbytes()))
        if self.shadow_trunk_type is not None:
            out.append((shadow_trunk_file_name(requant.type_name(self.shadow_trunk_type)), self.shadow_trunk_nbytes()))
        return out

    def total_nbytes(self) -> int:
        return sum(size for _, size in self.files())


_PART_ORDER = {"gate": 0, "up": 1, "gate_up": 1, "down": 2}


def requantize_in_trunk(t: ReaderTensor) -> bool:
    """Trunk tensors the shadow trunk requantizes: 2-D+ weights but the routers (llama.cpp's rule)."""
    return t.name.endswith(".weight") and len(t.shape) >= 2 and int(t.shape[1]) > 1 and "ffn_gate_inp" not in t.name


def plan_conversion(src: str | os.PathLike[str], *, shadow_type: str | None = None,
                    shadow_trunk_type: str | None = None, shadow_fallback_type: str | None = None,
                    shadow_imatrix: str | os.PathLike[str] | None = None) -> ConversionPlan:
    """Validate the source and lay out the conversion. Raises UserError on any bad input.

    shadow_type (e.g. "q4_k"): also write every routed expert requantized to it, stacked, for the
    shadow predictor; shadow_fallback_type: the type of the expert tensors whose rows shadow_type
    cannot take (as llama.cpp's quantizer falls back, but asked for); shadow_trunk_type: also a
    requantized copy of the trunk; shadow_imatrix: an importance matrix (llama.cpp's imatrix GGUF)
    weighting the shadow experts' requantization.
    """
    src = Path(src)
    s_type = requant.parse_shadow_type(shadow_type) if shadow_type else None
    t_type = requant.parse_shadow_type(shadow_trunk_type, "--shadow-trunk-type") if shadow_trunk_type else None
    if t_type is not None and s_type is None:
        raise UserError("--shadow-trunk-type needs --shadow-type (the shadow's experts)")
    f_type = requant.parse_shadow_type(shadow_fallback_type, "--shadow-fallback-type") if shadow_fallback_type else None
    if f_type is not None and s_type is None:
        raise UserError("--shadow-fallback-type needs --shadow-type (the shadow's experts)")
    if shadow_imatrix is not None and s_type is None:
        raise UserError("--shadow-imatrix needs --shadow-type (the shadow's experts)")
    reader = open_gguf(src)
    arch_name = get_str(reader, "general.architecture")
    if arch_name is None:
        raise UserError(f"{src}: no general.architecture key; not a llama.cpp model file")

    stacked: dict[int, list[StackedExpertTensor]] = {}
    trunk: list[ReaderTensor] = []
    for t in reader.tensors:
        parsed = parse_expert_tensor(t.name)
        if parsed is None:
            trunk.append(t)
            continue
        layer, part, kind = parsed
        stacked.setdefault(layer, []).append(
            StackedExpertTensor(t.name, layer, part, kind, t, tensor_ne(t), GGMLQuantizationType(int(t.tensor_type)))
        )

    n_experts = get_int(reader, f"{arch_name}.expert_count")
    if not stacked or not n_experts:
        raise UserError(f"{src}: a dense model ({arch_name}, no routed expert tensors); only MoE models can be split")
    arch = ARCHITECTURES.get(arch_name)
    if arch is None:
        raise UserError(f"{src}: unsupported architecture '{arch_name}' (supported: {', '.join(sorted(ARCHITECTURES))})")
    n_layers = get_int(reader, f"{arch_name}.block_count")
    n_used = get_int(reader, f"{arch_name}.expert_used_count")
    if not n_layers or not n_used:
        raise UserError(f"{src}: missing {arch_name}.block_count or {arch_name}.expert_used_count")

    n_dense = get_int(reader, f"{arch_name}.{arch.dense_lead_key}") or 0 if arch.dense_lead_key else 0
    for layer in range(n_layers):
        tensors = stacked.get(layer, [])
        if layer < n_dense:  # leading dense layers: an FFN in the trunk, no experts
            if tensors:
                raise UserError(f"{src}: layer {layer} has expert tensors ({tensors[0].name}), but "
                                f"{arch_name}.{arch.dense_lead_key} makes layers 0-{n_dense - 1} dense")
            continue
        if not tensors and arch.moe_layer_rule:
            continue  # a dense layer between MoE layers: whether it should be one is checked below
        weights = {t.part for t in tensors if t.kind == "weight"}
        if weights not in arch.expert_weight_sets:
            wanted = " or ".join("{" + ", ".join(f"ffn_{p}_exps" for p in sorted(s)) + "}" for s in arch.expert_weight_sets)
            have = ", ".join(sorted(f"ffn_{p}_exps" for p in weights)) or "none"
            raise UserError(f"{src}: layer {layer} has expert tensors [{have}]; {arch_name} needs {wanted}")
        for t in tensors:
            if t.kind == "weight" and not arch.allows_type(t.ggml_type.name):
                raise UserError(f"{src}: tensor {t.name} has type {t.ggml_type.name}, which {arch_name} expert weights cannot have")
            if len(t.ne) < 2 or t.ne[-1] != n_experts:
                raise UserError(f"{src}: tensor {t.name} has shape {list(t.ne)}; its last dimension must be the expert count {n_experts}")
            if int(t.tensor.n_bytes) % n_experts:
                raise UserError(f"{src}: tensor {t.name} ({t.tensor.n_bytes} bytes) does not split evenly into {n_experts} experts")
        _check_expert_biases(src, arch, tensors)
        _check_expert_shapes(src, layer, tensors)
        tensors.sort(key=lambda t: (t.kind != "weight", _PART_ORDER.get(t.part, 9), t.part))
    extra = sorted(set(stacked) - set(range(n_layers)))
    if extra:
        raise UserError(f"{src}: expert tensors for layer {extra[0]}, but the model has {n_layers} layers")
    if arch.moe_layer_rule:
        step = get_int(reader, f"{arch_name}.interleave_moe_layer_step")
        lead = get_int(reader, f"{arch_name}.leading_dense_block_count") or 0
        if not step or step < 0:
            raise UserError(f"{src}: {arch_name}.interleave_moe_layer_step is missing or not positive")
        want = interleaved_moe_layers(n_layers, lead, step)
        if sorted(stacked) != want:
            raise UserError(f"{src}: layers {sorted(stacked)} have experts, but {arch_name}'s metadata "
                            f"(leading_dense_block_count {lead}, interleave_moe_layer_step {step}) makes {want} MoE layers")

    name = get_str(reader, "general.name") or src.stem
    plan = ConversionPlan(src, reader, arch, name, n_layers, n_experts, n_used, trunk, stacked, s_type, t_type, f_type)
    if s_type is not None:
        weights = [t for t in plan.stacked_tensors() if t.kind == "weight"]
        rows = [t.ne[0] for t in weights]
        for t in weights:
            if f_type is not None and not requant.fits(t.ne[0], s_type):
                requant.check_rows(str(src), t.name, t.ne[0], f_type, rows, "--shadow-fallback-type")
            else:
                requant.check_rows(str(src), t.name, t.ne[0], s_type, rows, "--shadow-type", fallback_hint=True)
        if shadow_imatrix is not None:
            plan.shadow_imatrix = _checked_imatrix(shadow_imatrix, weights, n_experts)
            plan.shadow_imatrix_sha256 = sha256_file(shadow_imatrix)
    if t_type is not None:
        requantized = [t for t in trunk if requantize_in_trunk(t)]
        rows = [int(t.shape[0]) for t in requantized]
        for t in requantized:
            requant.check_rows(str(src), t.name, int(t.shape[0]), t_type, rows, "--shadow-trunk-type")
    return plan


def _checked_imatrix(path: str | os.PathLike[str], weights: list[StackedExpertTensor], n_experts: int) -> Imatrix:
    """The imatrix at path, with an entry of the right shape for every routed expert weight."""
    im = read_imatrix(path)
    for t in weights:
        sums = im.sums.get(t.name)
        if sums is None:
            raise UserError(f"{path}: no entry for {t.name}; was the importance matrix made for this model?")
        if sums.shape != (n_experts, t.ne[0]):
            raise UserError(f"{path}: {t.name} has {sums.shape[0]} matrices of {sums.shape[1]} columns, "
                            f"the model has {n_experts} experts of {t.ne[0]}")
    return im


def _check_expert_biases(src: Path, arch: MoeArch, tensors: list[StackedExpertTensor]) -> None:
    """Expert biases only where the architecture has them: F32 [n_out, n_expert], one per weight."""
    weights = {t.part: t for t in tensors if t.kind == "weight"}
    for t in tensors:
        if t.kind != "bias":
            continue
        if not arch.expert_biases:
            raise UserError(f"{src}: tensor {t.name}: {arch.name} has no expert biases")
        if t.ggml_type != GGMLQuantizationType.F32:
            raise UserError(f"{src}: tensor {t.name} has type {t.ggml_type.name}; expert biases must be F32")
        w = weights.get(t.part)
        if w is None or len(t.ne) != 2 or t.ne[0] != w.ne[1]:
            raise UserError(f"{src}: tensor {t.name} has shape {list(t.ne)}; expected "
                            f"{[w.ne[1], w.ne[-1]] if w else '[n_out, n_expert]'} to match ffn_{t.part}_exps.weight")


def _check_expert_shapes(src: Path, layer: int, tensors: list[StackedExpertTensor]) -> None:
    """gate/up map n_embd -> n_ff, down maps n_ff -> n_embd; a mismatch means a broken file."""
    w = {t.part: t.ne for t in tensors if t.kind == "weight"}
    down = w["down"]
    if len(down) != 3:
        raise UserError(f"{src}: {expert_tensor_name(layer, 'down')} has shape {list(down)}; expected [n_ff, n_embd, n_expert]")
    n_ff, n_embd = down[0], down[1]
    expected = {"gate": (n_embd, n_ff), "up": (n_embd, n_ff), "gate_up": (n_embd, 2 * n_ff)}
    for part, ne in w.items():
        if part in expected and tuple(ne[:2]) != expected[part]:
            raise UserError(
                f"{src}: {expert_tensor_name(layer, part)} has shape {list(ne)}; "
                f"expected {[*expected[part], down[2]]} to match ffn_down_exps {list(down)}"
            )
