"""Logical axis names: the one place they are spelled.

Every parameter is annotated with these names (`nn.with_logical_partitioning`) and activations with the
`ACT_*` names (`nn.with_logical_constraint`). Rules that map them to mesh axes live in the config, so a
model file never mentions a mesh axis.
"""

# Parameter axes.
EMBED = "embed"  # input features of a dense layer / channels going into a layer
MLP = "mlp"  # output features of a dense layer that widens (FF, q/k/v projections)
HEADS = "heads"  # attention inner dimension (heads x head_dim)
VOCAB = "vocab"
CONV_IN = "conv_in"  # input channels of a convolution kernel
CONV_OUT = "conv_out"  # output channels of a convolution kernel
KERNEL_SPACE = "kernel_space"  # spatial/temporal extent of a convolution kernel (never sharded)
NORM = "norm"  # scale/bias of normalisation layers and biases (small; replicated)
POSITION = "position"  # position-embedding rows

# Activation axes.
ACT_BATCH = "activation_batch"
ACT_LENGTH = "activation_length"  # sequence / spatial positions
ACT_EMBED = "activation_embed"  # channels
ACT_HEIGHT = "activation_height"
ACT_WIDTH = "activation_width"

PARAM_AXES = (EMBED, MLP, HEADS, VOCAB, CONV_IN, CONV_OUT, KERNEL_SPACE, NORM, POSITION)
ACTIVATION_AXES = (ACT_BATCH, ACT_LENGTH, ACT_EMBED, ACT_HEIGHT, ACT_WIDTH)
