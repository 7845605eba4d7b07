from setuptools import setup

# nnUNetv2_kd_export --onnx / nnUNetv2_kd_predict_onnx; versions measured together with torch 2.14.1.
ONNX_REQUIRES = ["onnxruntime==1.32.0", "onnx==1.23.2"]

setup(
    name="nnunet-kd",
    version="0.1.0",
    description="Knowledge distillation from frozen nnU-Net v2 teachers into small, fast nnU-Net students",
    long_description=open("README.md").read() if __import__("os").path.isfile("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The repository's top-level trainers/ (the folder nnUNet_extTrainer points at) and plans/ (recipe presets)
    # are installed inside the package, so `pip install .` ships them; see nnunet_kd/resources.py.
    packages=["nnunet_kd", "nnunet_kd.distill", "nnunet_kd.evidence", "nnunet_kd.losses", "nnunet_kd.trainers",
              "nnunet_kd.plans"],
    package_dir={"nnunet_kd.trainers": "trainers", "nnunet_kd.plans": "plans"},
    package_data={"nnunet_kd.plans": ["*.json"]},
    install_requires=[
        "nnunetv2==2.8.1",
        # nnunetv2 pulls torchvision (through timm); the two must be released together.
        "torch==2.14.1",
        "torchvision==0.29.1",
        "batchgenerators>=0.25",
        "SimpleITK>=2.2",
        "numpy>=1.24",
        "acvl-utils>=0.2",
    ],
    extras_require={
        # The suite tests the ONNX export and predictor too.
        "test": ["pytest>=7"] + ONNX_REQUIRES,
        "onnx": ONNX_REQUIRES,
    },
    entry_points={
        "console_scripts": [
            "nnUNetv2_kd_trainers_dir=nnunet_kd.resources:print_trainers_dir",
            "nnUNetv2_kd_plan_student=nnunet_kd.planning:plan_student_main",  # planning.main + nnUNet_extTrainer check
            "nnUNetv2_kd_export=nnunet_kd.export:main",
            "nnUNetv2_kd_predict_onnx=nnunet_kd.onnx_predict:main",
            "nnUNetv2_kd_demo=nnunet_kd.demo:main",
            "nnUNetv2_kd_benchmark=nnunet_kd.benchmark:main",
            "nnUNetv2_kd_plan_subset_teachers=nnunet_kd.subsets:main",
        ],
    },
)
