"""The official training-set protocol (configs/official_protocol.yaml): every training image, the last partial
batch kept, the official number of SGD steps per epoch (devicerxx/SGLS main_adv.py: DataLoader(batch_size=128,
shuffle=True) over the 50,000 CIFAR training images: ceil(50000 / 128) = 391 steps)."""
import glob
import json
import math
import os

from engine import config
from engine.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERLAY = os.path.join(ROOT, 'configs', 'official_protocol.yaml')
CIFAR_TRAIN = 50_000


def test_the_overlay_changes_only_the_training_set_protocol_of_every_table_config():
    for f in sorted(glob.glob(os.path.join(ROOT, 'configs', '*', '*.yaml'))):
        table, official = config.flat(config.load([f])), config.flat(config.load([f, OVERLAY]))
        changed = {k for k in table if table[k] != official[k]}
        assert changed == {'data.val_size', 'data.drop_last', 'output.dir'}, f
        assert (official['data.val_size'], official['data.drop_last'], official['training.batch_size']) == \
            (0, False, 128), f
        assert (table['data.val_size'], table['data.drop_last']) == (1000, True), f


def test_the_official_protocol_trains_every_image_in_391_steps(tmp_path, monkeypatch):
    """One epoch over 50,000 CIFAR-sized-count synthetic images (16x16, to be quick) with a table config's
    protocol overlay: 391 steps (390 of 128, one of 80) and every image once; the table protocol: 382 full steps."""
    steps = []

    def counted(model, optimizer, batch, **kw):
        steps.append(batch[1].shape[0])
        return train_step(model, optimizer, batch, **kw)
    train_step = loop.train_step
    monkeypatch.setattr(loop, 'train_step', counted)
    common = ['--data.dataset=synthetic', f'--data.dir={tmp_path / "data"}', f'--data.synthetic_n_train={CIFAR_TRAIN}',
              '--data.synthetic_n_test=64', '--data.synthetic_shape=3,16,16', '--model.arch=small_cnn',
              '--model.width=4', '--method.name=ce', '--training.epochs=1', '--training.engine=eager',
              '--evaluation.subset=64', '--evaluation.pgd_steps=1', '--evaluation.final_n=64',
              '--evaluation.final_pgd_steps=1', '--evaluation.cw_steps=0', '--evaluation.fgsm=false',
              '--evaluation.autoattack=false', '--evaluation.every=1']
    table = os.path.join(ROOT, 'configs', 'cifar10', 'resnet18_at.yaml')
    run = loop.train(config.load([table, OVERLAY], [*common, f'--output.dir={tmp_path}']), log=lambda *_: None)
    assert len(steps) == math.ceil(CIFAR_TRAIN / 128) == 391 and steps[-1] == CIFAR_TRAIN - 390 * 128 == 80
    with open(os.path.join(run, 'metrics.jsonl')) as f:
        assert json.loads(f.readline())['images'] == CIFAR_TRAIN
    steps.clear()
    loop.train(config.load([table], [*common, f'--output.dir={tmp_path / "table"}']), log=lambda *_: None)
    assert len(steps) == (CIFAR_TRAIN - 1000) // 128 == 382 and set(steps) == {128}
