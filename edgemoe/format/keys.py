"""The edgemoe.* metadata namespace added to every trunk and expert GGUF (see docs/FORMAT.md)."""

FORMAT_VERSION = "edgemoe.format_version"
ROLE = "edgemoe.role"  # "trunk" or "expert"
SOURCE_SHA256 = "edgemoe.source.sha256"
N_LAYERS = "edgemoe.n_layers"
N_EXPERTS = "edgemoe.n_experts"
N_EXPERTS_USED = "edgemoe.n_experts_used"
EXPERT_LAYER = "edgemoe.expert.layer"
EXPERT_INDEX = "edgemoe.expert.index"
SHADOW_TYPE = "edgemoe.shadow.type"  # ggml type name of a shadow file's requantized weights
SHADOW_FALLBACK_TYPE = "edgemoe.shadow.fallback_type"  # the type of the expert tensors whose rows the shadow type can't take
SHADOW_IMATRIX = "edgemoe.shadow.imatrix_sha256"  # sha256 of the importance matrix the requantization was weighted by

ROLE_TRUNK = "trunk"
ROLE_EXPERT = "expert"
ROLE_SHADOW = "shadow"  # shadow-<type>.gguf: all routed experts, requantized
ROLE_SHADOW_TRUNK = "shadow-trunk"  # shadow-trunk-<type>.gguf: the trunk, requantized
