from nnunet_kd.trainer import nnUNetTrainerKD


class nnUNetTrainerKD_MultiTeacher(nnUNetTrainerKD):
    """Several teachers (e.g. subset teachers) distilled into one student: Adaptive KD's terms on the teachers'
    per-voxel adaptive mixture, with out-of-sample routing. Recipe: the 'multi_teacher' section of the student plans
    (preset plans/multi_teacher.json)."""
    kd_method = "multi_teacher"
