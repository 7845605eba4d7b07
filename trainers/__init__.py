"""Thin nnU-Net trainer classes. Point nnUNet_extTrainer here: export nnUNet_extTrainer="$(nnUNetv2_kd_trainers_dir)".

nnU-Net imports these modules by path and drops them from sys.modules afterwards, so each file only names a
method; the code lives in the installed nnunet_kd package.
"""
