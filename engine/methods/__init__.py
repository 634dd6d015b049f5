"""Training objectives: each method is a small loss over the shared PGD attack, and says what it needs.

A method declares, next to its loss (engine/methods/base.py Method):
- `attack`: what the training attack maximises and from where (an Objective), or None (no adversarial examples);
- `soft_labels`: whether it keeps a per-image soft-label table (engine.soft_labels), and `table_class`, which
  (SoftLabels, one-hot at first; TE's EnsembleTable, zero at first);
- `params`: the config keys of the `method` section it reads (declared in PARAMS by its module, which
  engine.config turns into that section), set as attributes of the same name;
- `phase(epoch)`: what makes one epoch's step compute something else than another's (SGLS before and after
  its start epoch); the step is compiled and captured once per phase. A value that changes every epoch without
  changing the step (TE's ramp weight) is not a phase: the method keeps it in a device tensor that
  `begin_epoch(epoch)` fills on the host before the epoch's first step (a captured graph replays what it holds);
- `distills` and `attack_target(teacher, x)`: whether it learns from a frozen teacher, and the KL attack's target;
- `packable` (and `not_packable_because`): whether it may train as packed seeds (engine.packing);
- `loss(model, batch)` -> (loss, logits on which robust training accuracy is measured). The loss calls the
  model on batch.x and batch.x_adv itself, in its own order: train-mode forwards move BatchNorm statistics.
Adding a method is a class in one of these modules with its keys in PARAMS, listed in METHODS below; nothing else
tests a method's name.

Modules: base (Objective, LossInputs, PARAMS, Method, shared losses, label noise); adversarial (ce, at, trades,
sgls, sgls_trades: the official SGLS and TRADES code); baselines (at_ls, trades_sat, te, mart); awp (at_awp,
trades_awp); distillation (rslad, ard). Each names its sources (repository, file, commit, lines).
"""
from engine.methods.base import (CE_ATTACK, KL_ATTACK, LABEL_NOISE_PARAMS, PARAMS, LossInputs, Method, Objective,
                                 corrupt_labels, soft_cross_entropy, trades_kl)
from engine.methods.adversarial import AT, CE, SGLS, TRADES, TRADES_ORDERS, SGLSTrades, _SoftLabelled
from engine.errors import ConfigError

PARAMS.update(LABEL_NOISE_PARAMS)  # after the adversarial methods' keys, as the config section always listed them

from engine.methods.baselines import ATLS, MART, TE, TradesSAT, sigmoid_rampup  # noqa: E402
from engine.methods.distillation import ARD, RSLAD  # noqa: E402
from engine.methods.awp import ATAWP, TradesAWP  # noqa: E402

METHODS = {m.name: m for m in (CE, AT, TRADES, SGLS, SGLSTrades, ATLS, TradesSAT, TE, MART, ATAWP, TradesAWP, RSLAD,
                               ARD)}


def make_method(name: str, **values) -> Method:
    """The method called `name` with the given parameters (the others at their defaults)."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name](**values)


def method_from_config(section) -> Method:
    """The method of a config's `method` section, reading only the keys it declares."""
    cls = METHODS[section.name]
    return cls(**{key: getattr(section, key) for key in cls.params})


__all__ = ['ARD', 'AT', 'ATAWP', 'ATLS', 'CE', 'CE_ATTACK', 'KL_ATTACK', 'LossInputs', 'MART', 'METHODS', 'Method',
           'Objective', 'PARAMS', 'RSLAD', 'SGLS', 'SGLSTrades', 'TE', 'TRADES', 'TRADES_ORDERS', 'TradesAWP',
           'TradesSAT', 'corrupt_labels', 'make_method', 'method_from_config', 'sigmoid_rampup', 'soft_cross_entropy',
           'trades_kl']
