"""Meta-train your own Keras model with MAML from your own loop (tiny random data)."""
import keras
import numpy as np
import tensorflow as tf

from trainer import keras_maml

inputs = keras.Input((28, 28, 1))
h = keras.layers.Conv2D(16, 3, strides=2, padding="same")(inputs)
h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
model = keras.Model(inputs, keras.layers.Dense(5)(keras.layers.GlobalAveragePooling2D()(h)))
learner = keras_maml.MAML(model, inner_lr=0.4)  # second order; first_order=True is cheaper
optimizer = keras.optimizers.Adam(1e-3)
rng = np.random.default_rng(0)
labels = np.tile(np.arange(5), (4, 1))  # 4 tasks, 5-way 1-shot, 1 query per class


@tf.function  # one graph for the whole meta-step (eagerly, each call would trace anew)
def meta_step(support_x, query_x):
  with tf.GradientTape() as tape:
    fast = learner.adapt(support_x, labels, steps=1)  # each task's adapted weights
    loss = learner.loss(fast, query_x, labels)  # the query loss after adaptation
  optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
  return loss


for step in range(3):
  support_x, query_x = (rng.random((4, 5, 28, 28, 1), np.float32) for _ in range(2))
  print(f"step {step}: query loss after adaptation {float(meta_step(support_x, query_x)):.3f}")
