"""The CNN, the class names it carries, and its compiled training form."""

import functools
import zipfile

import numpy as np

from utils.backend import backend, import_keras
from utils.config import IMAGE_SIZE, LABELS_FILE, LITERT_FILE, MICROSOFT_CLASSES, MODEL_FILE, OTHER_MODEL_STEM, WIDTHS

# The optimizer: "muon" (Muon's step for the convolution kernels too, see conv_muon), or "rmsprop" and
# "sgd-nesterov" (momentum 0.9, decoupled weight decay), which benchmarks/levers.py compares against it;
# all follow train.py's learning-rate schedule. Muon and the identity start below are the default because
# together they reach each accuracy sooner than RMSprop from a random start (benchmarks/README.md).
OPTIMIZER = dict(name="muon", momentum=0.9, weight_decay=5e-4)
DIRAC_INIT = True  # airbench's identity start for the blocks' convolutions (see dirac_init)
WHITEN_STEM = False  # airbench's frozen patch-whitening stem (see whitening_kernel): a lever, off
STEM, STEM_STRIDE = 16, 2  # the stem convolution's filters and stride (narrow, as the first block)
# A skip around each block's second convolution, so the block's output is relu1 + relu2 (a lever, off), and
# the share of training photos for which that second branch is dropped (stochastic depth; 0: never)
RESIDUAL, DROP_PATH = False, 0.0
# Training steps on TensorFlow normalise with its fused kernel (see fused_batch_norm): the same function, in
# fewer passes over the activations. False: Keras's BatchNormalization (benchmarks/levers.py keras-batch-norm)
FUSED_BATCH_NORM = True


def build_model(
    image_size=IMAGE_SIZE,
    class_names=("cat", "dog"),
    widths=WIDTHS,
    stem=None,
    dropout=0.3,
    block_dropout=0.1,
    bn_momentum=0.99,
    batch_norm=None,
):
    """The CNN: a strided Conv stem, then blocks of two Conv/BatchNorm/ReLU, MaxPool and Dropout,
    global average pooling, Dropout and the classifier: one sigmoid unit (the probability of the second
    class) for two classes, a softmax over N classes for more (1.16 M parameters by default). Its last
    layer, ClassNames, carries the names of the classes in output order.

    image_size None builds a fully convolutional model that takes any size (progressive resizing
    trains it so); the saved model is rebuilt at the final size, which predict.py reads from it.
    Layers are named, so weights move between the two builds by name. bn_momentum: how slowly
    BatchNormalization's statistics for inference follow the training batches (train.py's recipe derives it);
    batch_norm: its layer class (None: Keras's; compile_model trains with fused_batch_norm's).
    stem: the stem's filters (None: STEM, read when the model is built, as benchmarks/levers.py sets it).
    """
    keras = import_keras()
    layers = keras.layers
    batch_norm = batch_norm or layers.BatchNormalization

    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = layers.Rescaling(1 / 255, name="rescale")(inputs)
    x = layers.Conv2D(stem or STEM, 3, strides=STEM_STRIDE, padding="same", use_bias=False, name="stem_conv")(x)
    x = batch_norm(momentum=bn_momentum, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for i, width in enumerate(widths, 1):
        for j in (1, 2):
            skip = x  # the second convolution's input: relu1
            x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"block{i}_conv{j}")(x)
            x = batch_norm(momentum=bn_momentum, name=f"block{i}_bn{j}")(x)
            x = layers.ReLU(name=f"block{i}_relu{j}")(x)
        if RESIDUAL:  # read when the model is built, as benchmarks/levers.py sets it
            if DROP_PATH:  # the whole branch, photo by photo, scaled up by 1 / (1 - DROP_PATH) when kept
                x = layers.Dropout(DROP_PATH, noise_shape=(None, 1, 1, 1), name=f"block{i}_drop_path")(x)
            x = layers.Add(name=f"block{i}_add")([skip, x])
        x = layers.MaxPooling2D(name=f"block{i}_pool")(x)
        x = layers.Dropout(block_dropout, name=f"block{i}_dropout")(x)
    x = layers.GlobalAveragePooling2D(name="average")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    n = len(class_names)
    if n < 2:
        raise ValueError(f"a classifier needs two or more classes, not {list(class_names)}")
    if n == 2:
        x = layers.Dense(1, activation="sigmoid", dtype="float32", name="probability")(x)
    else:
        x = layers.Dense(n, activation="softmax", dtype="float32", name="probabilities")(x)
    outputs = class_names_layer()(class_names, dtype="float32", name="class_names")(x)
    return keras.Model(inputs, outputs, name="classifier")


def model_files(class_names):
    """(keras file, tflite file) names for a class set: cats_vs_dogs.* for cat/dog, model.* for any other."""
    if tuple(class_names) == tuple(name for _, name in MICROSOFT_CLASSES.values()):
        return MODEL_FILE, LITERT_FILE
    return f"{OTHER_MODEL_STEM}.keras", f"{OTHER_MODEL_STEM}.tflite"


@functools.cache
def class_names_layer():
    """The Keras layer that carries a model's class names in its config: an identity on the output, so
    the names are saved in the .keras file's config.json, survive load and save, and cost nothing in the
    LiteRT copy. Registered under "catsdogs>ClassNames", which load_model finds once this has run."""
    keras = import_keras()

    @keras.saving.register_keras_serializable(package="catsdogs")
    class ClassNames(keras.layers.Layer):
        def __init__(self, names, **kwargs):
            super().__init__(**kwargs)
            self.names = [str(n) for n in names]

        def call(self, x):
            return x

        def compute_output_shape(self, shape):
            return shape

        def get_config(self):
            return {**super().get_config(), "names": self.names}

    return ClassNames


def names_of_keras_model(model):
    """Class names carried by a model built by build_model, or None."""
    cls = class_names_layer()
    layers = [layer for layer in model.layers if isinstance(layer, cls)]
    return layers[-1].names if layers else None


def labels_bytes(class_names):
    """labels.txt: one class name a line, in output order, UTF-8 (beside the models and inside the .tflite)."""
    return "".join(f"{name}\n" for name in class_names).encode("utf-8")


def read_labels(data):
    """The class names of labels.txt's bytes."""
    return data.decode("utf-8").splitlines()


def pack_labels(tflite_path, class_names):
    """Append labels.txt to a .tflite file as an associated file, the way LiteRT's metadata tools
    (Model Maker, Teachable Machine) pack them: a zip archive after the flatbuffer, which the
    interpreter ignores and any zip reader finds."""
    with zipfile.ZipFile(tflite_path, "a") as zf:
        zf.writestr(LABELS_FILE, labels_bytes(class_names))


def unpack_labels(tflite_path):
    """The class names packed into a .tflite file (pack_labels), or None. No TensorFlow needed."""
    try:
        with zipfile.ZipFile(tflite_path) as zf:
            return read_labels(zf.read(LABELS_FILE))
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, OSError):
        return None


def widths(multiplier):
    """Filters of the four blocks: WIDTHS times --width."""
    return tuple(max(8, round(w * multiplier)) for w in WIDTHS)


def dirac_init(model):
    """Start each block convolution as the identity on its first filters (airbench's "dirac" init): filter k
    passes input channel k through its centre tap, for k below the smaller of the two channel counts."""
    for layer in model.layers:
        if layer.name.startswith("block") and "_conv" in layer.name:
            kernel = layer.get_weights()[0]
            rows, cols, channels_in, channels_out = kernel.shape
            n = min(channels_in, channels_out)
            kernel[..., :n] = 0
            kernel[rows // 2, cols // 2, range(n), range(n)] = 1
            layer.set_weights([kernel])


def whitening_kernel(images, filters=None, size=3, eps=5e-4, sample=256, chunk=32):
    """airbench's patch-whitening filters for the stem, from up to `sample` training images (pixels scaled to
    [0, 1]): the principal directions of their size x size patches (at the stem's stride), each divided by
    its standard deviation. The top filters // 2 and their negatives, so that the ReLU after them keeps both
    signs. A (size, size, channels, filters) kernel for the stem's Conv2D (filters None: STEM)."""
    filters = filters or STEM
    pick = np.linspace(0, len(images) - 1, min(sample, len(images))).astype(int)
    moment, count = 0.0, 0
    for start in range(0, len(pick), chunk):  # a chunk's patches at a time: 256 images' would take 180 MB
        x = np.asarray(images[pick[start : start + chunk]], dtype="float32") / 255
        every = np.lib.stride_tricks.sliding_window_view(x, (size, size), axis=(1, 2))
        windows = every[:, ::STEM_STRIDE, ::STEM_STRIDE]
        patches = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, size * size * x.shape[-1])  # (row, col, channel)
        moment, count = moment + patches.T @ patches, count + len(patches)
    values, vectors = np.linalg.eigh(moment / count)  # ascending
    top = vectors[:, ::-1][:, : filters // 2] / np.sqrt(values[::-1][: filters // 2] + eps)
    kernel = top.reshape(size, size, x.shape[-1], filters // 2)
    return np.concatenate([kernel, -kernel], axis=-1).astype("float32")


def stem_kernel(train_images):
    """The stem's fixed filters: whitening_kernel's where WHITEN_STEM is set, else None (trained from random)."""
    return whitening_kernel(train_images) if WHITEN_STEM else None


@functools.cache
def fused_batch_norm():
    """keras.layers.BatchNormalization whose training step, on TensorFlow, is one fused kernel (and one for its
    gradient), which oneDNN runs on the 16-bit activations, where Keras 3 computes the batch's moments and the
    normalisation op by op in float32: faster training steps (benchmarks/README.md). The same function:
    Keras's moving averages of the batch's mean and (uncorrected) variance, and Keras's own call for
    inference, masks and other backends. Weights move to and from Keras's layer unchanged."""
    keras = import_keras()
    if backend() != "tensorflow":
        return keras.layers.BatchNormalization
    import tensorflow as tf

    class FusedBatchNormalization(keras.layers.BatchNormalization):
        def call(self, inputs, training=None, mask=None):
            plain = self.renorm or self.synchronized or not (self.scale and self.center) or mask is not None
            if not (training and self.trainable) or plain or len(inputs.shape) != 4 or self.axis not in (-1, 3):
                return super().call(inputs, training=training, mask=mask)
            y, mean, variance, *_ = tf.compat.v1.nn.fused_batch_norm(
                inputs, self.gamma, self.beta, epsilon=self.epsilon, data_format="NHWC", is_training=True
            )
            n = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], "float32")
            variance *= (n - 1) / n  # the kernel returns Bessel's corrected variance; Keras averages the plain one
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1 - self.momentum))
            return y

    return FusedBatchNormalization


@functools.cache
def conv_muon():
    """keras.optimizers.Muon, which gives Muon's step only to 2-D kernels (here the classifier's), with
    it for the 4-D convolution kernels as well: each flattened to (rows x cols x inputs, filters)."""
    keras = import_keras()
    ops = keras.ops

    class ConvMuon(keras.optimizers.Muon):
        def _should_use_adamw(self, variable):
            return len(variable.shape) != 4 and super()._should_use_adamw(variable)

        def _muon_update_step(self, gradient, variable, lr, m):
            shape = variable.shape
            self.assign_add(m, ops.add(gradient, m * (self.momentum - 1)))
            g = ops.add(gradient, self.momentum * m) if self.nesterov else m
            update = self.zeropower_via_newtonschulz5(ops.reshape(g, (-1, shape[-1])), self.ns_steps)
            self.assign_sub(variable, ops.reshape(self.lr_adjust(lr * update), shape))

    return ConvMuon


def make_optimizer(keras, schedule, ema):
    """OPTIMIZER's optimizer at the learning rates of schedule, averaging the weights with momentum ema (0: not)."""
    averaging = dict(use_ema=ema > 0, ema_momentum=ema or 0.99)
    if OPTIMIZER["name"] == "sgd-nesterov":
        momentum, decay = OPTIMIZER["momentum"], OPTIMIZER["weight_decay"]
        return keras.optimizers.SGD(schedule, momentum=momentum, nesterov=True, weight_decay=decay, **averaging)
    if OPTIMIZER["name"] == "muon":
        return conv_muon()(schedule, **averaging)
    if OPTIMIZER["name"] == "rmsprop":
        return keras.optimizers.RMSprop(schedule, **averaging)
    raise ValueError(f"utils.model.OPTIMIZER: no optimizer named {OPTIMIZER['name']!r}")


def compile_model(
    class_names,
    image_size,
    steps,
    width,
    bn_momentum,
    epochs,
    learning_rate,
    warmup_steps,
    label_smoothing,
    ema,
    stem_filters=None,
):
    """The trainable model (image_size None: any size), compiled for `epochs` of `steps`: OPTIMIZER warmed up
    to learning_rate, then decayed along a cosine; the loss with label_smoothing; ema: the momentum of the
    weights' moving average (0: none); stem_filters: the stem's kernel, then frozen (stem_kernel)."""
    keras = import_keras()
    warmup = min(warmup_steps, max(1, (epochs - 1) * steps))
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(1, epochs * steps - warmup), warmup_target=learning_rate, warmup_steps=warmup
    )
    norm = fused_batch_norm() if FUSED_BATCH_NORM else None
    model = build_model(image_size, class_names, widths=widths(width), bn_momentum=bn_momentum, batch_norm=norm)
    if DIRAC_INIT:
        dirac_init(model)
    if stem_filters is not None:
        model.get_layer("stem_conv").set_weights([stem_filters])
        model.get_layer("stem_conv").trainable = False
    loss = keras.losses.BinaryCrossentropy if len(class_names) == 2 else keras.losses.CategoricalCrossentropy
    model.compile(
        optimizer=make_optimizer(keras, schedule, ema),
        loss=loss(label_smoothing=label_smoothing),
        metrics=["accuracy"],
        jit_compile=backend() != "tensorflow",  # JAX always compiles with XLA; TensorFlow's CPU kernels are faster
    )
    return model
