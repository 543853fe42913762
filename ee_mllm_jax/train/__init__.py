"""Training: state and optimizer (`state`), loss and step (`step`), Orbax checkpoints
(`checkpoint`), evaluators (`evaluators`), metrics and rates (`progress`), TensorBoard events
(`tensorboard`), the loss curve (`plots`) and `train(config)`, its phases over one `Run` (`loop`).
Loading a model without training is `ee_mllm_jax.loading`."""

from ee_mllm_jax.train.state import OptimConfig, make_optimizer, merge_params, split_params
from ee_mllm_jax.train.step import eval_metrics, make_eval_step, make_train_step, masked_cross_entropy

__all__ = ["OptimConfig", "eval_metrics", "make_eval_step", "make_optimizer", "make_train_step",
           "masked_cross_entropy", "merge_params", "split_params"]
