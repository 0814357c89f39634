"""LightningModules for the four test problems of "Dissecting Adam" (docs/problems.md, as DeepOBS defines them).

=====================  ==================  ============  ===================
DeepOBS problem        class               parameters    default wd
=====================  ==================  ============  ===================
``fmnist_2c2d``        :class:`TwoC2D`         3,274,634  0
``cifar10_3c3d``       :class:`ThreeC3D`         895,210  0.002
``cifar100_wrn404``    :class:`WideResNet404`  8,972,340  5e-4
``tolstoi_char_rnn``   :class:`CharLSTM`         284,499  0
=====================  ==================  ============  ===================

Beyond the paper: :class:`CharTransformer`, a small decoder-only transformer with a tied
embedding/output layer on the same War and Peace batches (``configs/tolstoi_transformer.yaml``).

None of them defines ``configure_optimizers``: the optimizer under study is
supplied by LightningCLI (``--optimizer``/``--lr_scheduler``) or by the user.
"""

from .base import EVAL_SPLITS, ClassificationProblem
from .char_rnn import CharLSTM, TFLSTMLayer
from .cnn import ThreeC3D, TwoC2D
from .transformer import CharTransformer, TransformerBlock
from .tf_compat import TFSameConv2d, TFSameMaxPool2d, TFSamePad, tf_same_padding
from .wrn import PreActResidualUnit, WideResNet404

__all__ = [
    "EVAL_SPLITS",
    "ClassificationProblem",
    "TwoC2D",
    "ThreeC3D",
    "WideResNet404",
    "PreActResidualUnit",
    "CharLSTM",
    "TFLSTMLayer",
    "CharTransformer",
    "TransformerBlock",
    "TFSamePad",
    "TFSameConv2d",
    "TFSameMaxPool2d",
    "tf_same_padding",
]
