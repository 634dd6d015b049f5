"""Weight EMA (engine.weight_ema): the averaged weights equal the recurrence computed by hand, inside the training
step (one model and packed seeds); run-level behaviour (evaluation, best, final rows, resume) is in
tests/test_training.py."""
import copy

import torch

from engine.methods import make_method
from engine.models import build_model
from engine.packing import PackedSeeds, pack_models, seed_generator, unpack_state
from engine.step import train_step
from engine.weight_ema import WeightEMA
from tests.synthetic import synthetic_batches

ATTACK = dict(eps=16 / 255, step_size=8 / 255, steps=2, bn_mode='eval')
DECAY = 0.9


def model_of(seed):
    torch.manual_seed(seed)
    return build_model('small_cnn', 4, in_channels=3, width=8).double()


def test_ema_equals_the_recurrence_by_hand():
    """ema_t = d * ema_(t-1) + (1 - d) * w_t for weights and BN running statistics, ema_0 = w_0; integer buffers
    (num_batches_tracked) copied; the trained model untouched by the average."""
    x, y, idx, _ = synthetic_batches(0, steps=4, batch=16, classes=4)
    model = model_of(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = WeightEMA(model, DECAY)
    by_hand = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(4):
        train_step(model, optimizer, (x[i].double(), y[i], idx[i]), method=make_method('at'), attack=ATTACK,
                   soft_labels=None, epoch=1, ema=ema)
        for k, w in model.state_dict().items():
            by_hand[k] = DECAY * by_hand[k] + (1 - DECAY) * w if w.is_floating_point() else w.clone()
    averaged = ema.model.state_dict()
    for k, w in model.state_dict().items():
        torch.testing.assert_close(averaged[k], by_hand[k], rtol=1e-12, atol=1e-15, msg=k)
        if w.is_floating_point() and k.endswith('weight'):
            assert not torch.equal(averaged[k], w), f'{k}: the average is not the model'
    assert averaged['features.1.num_batches_tracked'] == 4
    assert not any(p.requires_grad for p in ema.model.parameters()) and not ema.model.training


def test_ema_state_round_trips():
    model = model_of(0)
    ema = WeightEMA(model, DECAY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    other = WeightEMA(model_of(1), DECAY)
    other.load_state_dict(copy.deepcopy(ema.state_dict()))
    for k, v in ema.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k


def test_packed_ema_is_each_seeds_ema():
    """The EMA of packed seeds, unpacked, is each seed's own recurrence over its own weights (float64), started
    from each seed's EMA (here: its initial weights)."""
    seeds = (0, 1)
    data = [synthetic_batches(s, steps=3, batch=16, classes=4) for s in seeds]
    singles = [model_of(s) for s in seeds]
    packed = pack_models(singles)
    packed_ema = WeightEMA(packed, DECAY, average=pack_models([WeightEMA(m, DECAY).model for m in singles]))
    optimizer = torch.optim.SGD(packed.parameters(), lr=0.1, momentum=0.9)
    generators = [seed_generator('cpu') for _ in seeds]
    by_hand = [{k: v.clone() for k, v in m.state_dict().items()} for m in singles]
    for i in range(3):
        xs = torch.stack([d[0][i].double() for d in data])
        ys, idxs = torch.stack([d[1][i] for d in data]), torch.stack([d[2][i] for d in data])
        train_step(packed, optimizer, (xs, ys, idxs), method=make_method('at'), attack=ATTACK, soft_labels=None,
                   epoch=1, seeds=PackedSeeds(len(seeds), generators), ema=packed_ema)
        for k, state in enumerate(unpack_state(packed)):
            for key, w in state.items():
                by_hand[k][key] = DECAY * by_hand[k][key] + (1 - DECAY) * w if w.is_floating_point() else w
    for k, averaged in enumerate(unpack_state(packed_ema.model)):
        for key, value in by_hand[k].items():
            torch.testing.assert_close(averaged[key], value, rtol=1e-12, atol=1e-15, msg=f'seed {k} {key}')
