"""Students for CNN/ViT collaborative learning: ``build_student(name, num_classes, **options)``."""
from .backbone import CNN_BACKBONES, VIT_BACKBONES, split_stages
from .students import DEFAULT_CNN, DEFAULT_VIT, STUDENTS, SegStudent, build_student, run_stage

__all__ = ["build_student", "run_stage", "SegStudent", "STUDENTS", "DEFAULT_CNN", "DEFAULT_VIT",
           "CNN_BACKBONES", "VIT_BACKBONES", "split_stages"]
