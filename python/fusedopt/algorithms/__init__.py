"""One module per optimizer algorithm: its state, hyperparameters (defaults, validation, table
columns), reference update in plain PyTorch (the paper's equations, float64-capable), statistics
and the public classes. The engine and the kernels know an algorithm only through this interface:

  NAME     the kernel code's name (engine/layout.py ALGORITHMS)
  STATE    names of its per-element state tensors (torch.optim's state keys), in kernel order
  HYPER    its own hyperparameter columns, after layout.COMMON_HYPER
  STATS    (column, reduction op) of its statistics partials, layout.COMMON_STATS first
  validate(group)               raise ValueError naming the hyperparameter
  hyper_values(group)           {name in HYPER: float}
  reference_update(param, grad, state, *, step, lr, weight_decay, int8_state, **hyper)
                                in place; int8_state: the form 8-bit state's kernels take
  reference_stats(state, grad, state_before, step, hyper)   its own STATS columns' values
  figures(values, numel)        per-tensor figures from its own STATS columns
  load_step(entry)              the step count a saved torch.optim state entry implies
"""
from fusedopt.algorithms import adamw, lion, sgd

REGISTRY = {module.NAME: module for module in (adamw, sgd, lion)}
