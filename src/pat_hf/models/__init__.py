"""The models layer: the teacher, the student, what is read from them, and the exported student.

- :mod:`.teacher`: :class:`Teacher` (frozen, eval mode, classes matched by name) and :func:`load_teacher`;
- :mod:`.student`: :func:`create_student` (a timm model by name, ``hf-hub:``, ``local-dir:`` or class);
- :mod:`.taps`: stage taps, hooks reading (and, for PAT's prompts, rewriting) the stage features of any model;
- :mod:`.recompute`: block-by-block recomputation of a frozen model's forward in the backward;
- :mod:`.compile`: ``torch.compile`` by regions and compiled-module helpers;
- :mod:`.export` and :mod:`.model_card`: the student alone in timm's Hub layout, with its model card.

Imports the data layer and the core modules, never ``methods`` or ``training``.
"""

from .export import export_student, load_student_weights
from .student import create_student
from .teacher import Teacher, load_teacher

__all__ = ["Teacher", "create_student", "export_student", "load_student_weights", "load_teacher"]
