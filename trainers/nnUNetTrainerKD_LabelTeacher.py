from nnunet_kd.trainer import nnUNetTrainerKD


class nnUNetTrainerKD_LabelTeacher(nnUNetTrainerKD):
    """Control: Adaptive KD's logit terms fed the one-hot ground truth instead of a teacher (no teacher is loaded).
    Recipe: the 'label_teacher' section of the student plans (preset plans/label_teacher.json)."""
    kd_method = "label_teacher"
    kd_teacher_source = "labels"
