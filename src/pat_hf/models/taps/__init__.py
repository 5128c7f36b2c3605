"""Stage taps: read (and, for PAT's prompts, rewrite) the stage features (up to 4) of teachers and students.

Any timm model (from ``feature_info``) and any transformers image classifier (from its hidden states) is cut into
up to 4 stages (see docs/architectures.md). A stage feature is read in a canonical layout described by
:class:`StageSpec`: a map (B, C, H, W), or tokens (B, P + H·W, C) whose P prefix tokens (cls, distillation,
registers) come FIRST, as in timm and transformers.

Split by what changes together, each part importing only those before it:

- :mod:`.layout`: :class:`StageSpec`, the layout conversions and the rule cutting blocks into 4 stages;
- :mod:`.generic`: the stage sites of any model, found from timm's and transformers' public APIs;
- :mod:`.families`: the family rules kept where the generic one is measurably wrong or the paper fixes the stages;
- :mod:`.engine`: the hook engine (:class:`StageTaps`, the probe) and :func:`build_taps`.
"""

from __future__ import annotations

from .embedding import EmbeddingTap, build_embedding_tap, find_classifier
from .engine import StageTaps, build_taps
from .families import _HIDDEN_KWARGS as _HIDDEN_KWARGS
from .families import SUPPORTED_STUDENTS, SUPPORTED_TEACHERS
from .families import _block_modules as _block_modules
from .layout import StageSpec, as_map, map_to_tokens, tokens_to_map
from .layout import _group_ranges as _group_ranges

__all__ = [
    "SUPPORTED_STUDENTS",
    "SUPPORTED_TEACHERS",
    "StageSpec",
    "StageTaps",
    "as_map",
    "build_taps",
    "map_to_tokens",
    "tokens_to_map",
]
__all__ += ["EmbeddingTap", "build_embedding_tap", "find_classifier"]  # the penultimate-embedding tap

# The private names imported above ``as`` themselves stay importable from ``pat_hf.models.taps`` as before the split
# (tests import ``_group_ranges``), outside ``__all__``.
