"""The paper's conv4 written as Keras models, for ``--model=keras:bench/keras_conv4.py:<name>``.

The bench's ``keras_*`` cases time the Keras path against the built-in conv4 at the same
architecture (trainer/keras_models.py against trainer/models.py); the layers match the built-in
model of the named config (``center=True, scale=False``: the original code's batch norm).
"""

import keras


def _conv4(input_shape, n_way, filters: int, maxpool: bool):
  inputs = keras.Input(input_shape)
  h = inputs
  for _ in range(4):
    h = keras.layers.Conv2D(filters, 3, strides=1 if maxpool else 2, padding="same",
                            use_bias=False)(h)
    h = keras.layers.BatchNormalization(epsilon=1e-3, scale=False)(h)
    h = keras.layers.ReLU()(h)
    if maxpool:
      h = keras.layers.MaxPooling2D(2)(h)
  h = keras.layers.Flatten()(h) if maxpool else keras.layers.GlobalAveragePooling2D()(h)
  return keras.Model(inputs, keras.layers.Dense(n_way, name="head")(h))


def omniglot(input_shape, n_way):
  """configs/omniglot_5w1s.cfg's conv4: 64 filters, stride-2 convs, spatial-mean features."""
  return _conv4(input_shape, n_way, 64, maxpool=False)


def mini(input_shape, n_way):
  """configs/mini_5w1s.cfg's conv4: 32 filters, 2x2 max-pool, flattened features."""
  return _conv4(input_shape, n_way, 32, maxpool=True)
