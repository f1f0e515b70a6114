"""teachdiag inside the trainers people run OPD with: TA-OPD's mask and a live fixed-bank monitor.

    from teachdiag.integrations.trl import TAOPDDistillationTrainer, TAOPDGKDTrainer   # pip install teachdiag[trl]
    from teachdiag.integrations.slime import make_reward_func, make_post_process  # slime's two hooks
    from teachdiag.integrations.verl import response_mask_from_topk, response_slice  # verl's response_mask
    from teachdiag.integrations.monitor import FixedBank, monitor_step, MonitorCallback

Modules: select (the selection's settings, its rule on signal arrays, the rows of a response
mask, what is logged about it), trl, slime, verl (one per trainer) and monitor (the checkpoint gain
of the current student against θ0 on a frozen bank, every N steps). Only trl.py needs its trainer
installed; slime.py and verl.py work on the tensors and objects those trainers hand over, so
neither is imported here.
"""
