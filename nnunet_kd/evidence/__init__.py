"""Held-out evidence: does a distilled student beat the same student trained without KD, on real scans?

The protocol (``benchmarks/run_evidence.py`` drives it; every step is a real nnU-Net command):

1. **A fixed held-out test split** (``benchmarks/splits/<dataset>.json``, written once with a seed and then only
   read): ``test`` cases never enter the workspace's raw training folder, so no model, plan or fingerprint sees
   them. The ``train`` cases get nnU-Net's own 5-fold cross-validation split (``crossval``, written as the
   workspace's ``splits_final.json``); fold 0's validation cases are where recipe choices are made.
2. **Models**: one teacher (nnU-Net's default network, plain nnU-Net loss) and, for every (method, width, seed),
   a student trained on the same fold's training cases. Seed s of every method starts from the same weights and
   sees the same batches (``nnUNet_n_proc_DA=0``), so per-case differences are paired.
3. **Test evaluation**: ``nnUNetv2_predict`` of every model on the test images, then nnU-Net's own
   ``nnUNetv2_evaluate_folder``: Dice, false-positive and false-negative voxels per case and class.
4. **Statistics**: for every KD method, the paired per-case difference to the plain student of the same width
   (and to the teacher), with a 95% bootstrap interval that resamples cases and seeds (``paired_bootstrap``).
5. **Budget**: the plain student's validation curve (nnU-Net's per-epoch pseudo Dice) over the last fifth of
   training, and the budget-doubling check (``budget_doubling_check``: the same seeds trained for longer, paired over
   validation cases). The last-fifth test alone is fooled by nnU-Net's polynomial learning rate, which flattens the
   end of every budget; every comparison is labelled final quality only where doubling the budget is shown not to
   raise the plain student's validation Dice by 0.01, learning speed where it does, and unchecked otherwise.

Everything that trains is resumable: a finished model (``checkpoint_final.pth`` + validation summary) is reused,
an interrupted one resumes with ``--c``, and the results file is rewritten after every model.

The package, bottom to top: ``statistics`` (per-case Dice, paired bootstrap, plateau), ``protocol`` (settings, names,
the --runs grammar, recipe variants, reproducing commands), ``split`` (the held-out split and the raw workspace),
``records`` (model records and the teacher archive), ``budget_check`` (budget doubling, record-set comparisons),
``workspace`` (the nnU-Net commands, run_protocol, the new-teacher guard), ``collect`` (what a workspace holds, latency, the records saved)
and ``report`` (the results document, tables and plots).
"""
