"""Hydra config groups (model/, stage/, data/, ..., recipes/), found as pkg://bitnet_train.configs."""
