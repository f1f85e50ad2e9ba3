"""Training: open_clip models and heads (`models`), the device and precision (`accel`), evaluation
(`evaluate`), the linear-probe head (`probe`), one fine-tuning run (`finetune`), a run's resumable
state on disk (`state`) and the tiny base's pretraining (`pretrain`).

Plain functions: no Ray, no MLflow. May import: config, data (and torch, open_clip, safetensors).
"""
