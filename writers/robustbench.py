"""RobustBench export of a run: robustbench.json (a model_info entry) and robustbench.safetensors (the weights).

The fields are those of RobustBench's model_info files (RobustBench/robustbench model_info/cifar10/Linf/*.json:
link, name, authors, additional_data, number_forward_passes, dataset, venue, architecture, eps, clean_acc, reported,
autoattack_acc, unreliable), with accuracies as text with two decimals as there, plus threat_model and what this
engine adds: the checkpoint exported (the best one when it was chosen on validation, else the final model), its
epoch and the evaluation settings. link, name, authors, venue and reported are left for the author to fill in.
autoattack_acc is null when the final table ran without AutoAttack: such an entry is not a RobustBench result.
"""
import os

from writers.atomic import atomic_path, write_json_atomic

ARCHITECTURES = {'resnet18': 'ResNet-18', 'preact_resnet18': 'PreActResNet-18', 'wrn34_10': 'WideResNet-34-10',
                 'wrn28_10': 'WideResNet-28-10', 'wrn70_16': 'WideResNet-70-16', 'mobilenet_v2': 'MobileNetV2',
                 'small_cnn': 'SmallCNN'}
THREAT_MODELS = {'linf': 'Linf', 'l2': 'L2'}
DATASETS = {'cifar10': 'cifar10', 'cifar100': 'cifar100'}   # RobustBench's names; others are not on RobustBench


def exported_row(rows):
    """'best' when a best checkpoint was chosen (on validation), else 'final'."""
    return 'best' if 'best' in rows else 'final'


def eps_text(norm, eps):
    """'8/255' for an L-inf eps that is a whole number of 1/255 steps, else the number ('0.5')."""
    k = eps * 255
    if norm == 'linf' and abs(k - round(k)) < 1e-6:
        return f'{round(k)}/255'
    return f'{eps:g}'


def _accuracy(value):
    return None if value is None else f'{value:.2f}'


def model_info(row, settings, *, arch, dataset, checkpoint, name=''):
    return {
        'link': '', 'name': name, 'authors': '', 'additional_data': False, 'number_forward_passes': 1,
        'dataset': DATASETS.get(dataset, dataset), 'venue': '', 'architecture': ARCHITECTURES.get(arch, arch),
        'eps': eps_text(settings['norm'], settings['eps']), 'clean_acc': _accuracy(row.get('clean')),
        'reported': '', 'autoattack_acc': _accuracy(row.get('autoattack')), 'unreliable': False,
        'threat_model': THREAT_MODELS[settings['norm']], 'checkpoint': checkpoint, 'epoch': row.get('epoch'),
        'evaluation': settings,
    }


def write(folder, row, settings, *, arch, dataset, checkpoint, state_dict=None, name=''):
    """robustbench.json in folder and, given a state_dict, robustbench.safetensors (both atomic)."""
    if state_dict is not None:
        from safetensors.torch import save_file
        tensors = {key: value.detach().cpu().contiguous().clone() for key, value in state_dict.items()}
        with atomic_path(os.path.join(folder, 'robustbench.safetensors')) as tmp:
            save_file(tensors, tmp, metadata={'architecture': arch, 'checkpoint': checkpoint})
    write_json_atomic(os.path.join(folder, 'robustbench.json'),
                      model_info(row, settings, arch=arch, dataset=dataset, checkpoint=checkpoint,
                                 name=name or os.path.basename(os.path.abspath(folder))))
