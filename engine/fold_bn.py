"""Eval-mode BatchNorm folded into the convolution before it, for the forwards that do not train.

In eval mode a BatchNorm after a convolution is an affine map per output channel c:
    bn(conv(x; W, b)) = conv(x; W * s, b * s + t),  s = gamma / sqrt(running_var + eps),  t = beta - running_mean * s
so the attack's K forwards and K input-gradient backwards per step, and the clean-accuracy forward, can run one
convolution with scaled weights instead of a convolution plus a normalization pass (and its backward) over the
activations (issue 12, item 2).

fold_bn(model) returns a view of the model: a torch.fx GraphModule that shares the model's modules, parameters
and buffers, with every conv -> BN pair replaced by a FoldedConvBN. The fold is computed from the live
parameters and running statistics in every call, so it is always the fold of the current weights (after every
optimizer step, also inside a replayed CUDA graph, where it is one more captured kernel). What is folded, and why
only that:
- a BatchNorm2d whose input is the output of a Conv2d that nothing else reads (post-activation ResNet: every
  conv -> bn; pre-activation nets: only the bn2 after conv1; small_cnn: all four);
- only while the BN is in eval mode: a BN in train mode (attack.bn_mode=train, or the training forward)
  normalizes by batch statistics, which no fixed fold reproduces, so FoldedConvBN then runs conv and BN as
  they are;
- never the input normalization (engine.models.Normalize) into the first conv: the conv's zero padding is zero
  in normalized space, which a folded weight would turn into -mean/std.
The training forward never uses the view (engine.step trains `model` itself). Exact in real arithmetic; in
floating point the products are rounded in another order (tests/test_fold_bn.py compares in float64).
"""
import torch
import torch.fx as fx
import torch.nn as nn


class FoldedConvBN(nn.Module):
    """bn(conv(x)) as one convolution with the BN's eval-mode affine map folded into its weight and bias."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        super().__init__()
        self.conv, self.bn = conv, bn  # the model's own modules (shared, not copies)

    def forward(self, x):
        conv, bn = self.conv, self.bn
        if bn.training or bn.running_var is None:  # batch statistics: nothing to fold
            return bn(conv(x))
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = bn.weight * scale
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        if conv.bias is not None:
            shift = shift + conv.bias * scale
        return conv._conv_forward(x, conv.weight * scale.reshape(-1, 1, 1, 1), shift)


def fold_bn(model: nn.Module) -> tuple[nn.Module, int]:
    """(the folded view of `model`, the number of conv -> BN pairs folded); the model itself when none is."""
    graph_module = fx.symbolic_trace(model)
    modules = dict(graph_module.named_modules())
    folded = 0
    for node in list(graph_module.graph.nodes):
        if node.op != 'call_module' or not isinstance(modules[node.target], nn.BatchNorm2d) or node.kwargs:
            continue
        source = node.args[0] if len(node.args) == 1 else None
        if not (isinstance(source, fx.Node) and source.op == 'call_module'
                and isinstance(modules[source.target], nn.Conv2d) and len(source.users) == 1):
            continue
        name = f'folded_conv_bn_{folded}'
        graph_module.add_submodule(name, FoldedConvBN(modules[source.target], modules[node.target]))
        with graph_module.graph.inserting_after(node):
            replacement = graph_module.graph.call_module(name, source.args, source.kwargs)
        node.replace_all_uses_with(replacement)
        graph_module.graph.erase_node(node)
        graph_module.graph.erase_node(source)
        folded += 1
    if not folded:
        return model, 0
    graph_module.graph.lint()
    graph_module.recompile()
    return graph_module, folded
