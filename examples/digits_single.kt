# digits_single.kt: the quickstart's student trained alone on labels, the baseline that
# quickstart.kt, digits_kd.kt and digits_dml.kt are compared with (same data, same training).
graph digits_single

data digits {
  augment = pad_crop
  pad = 1
  val_split = 800
}

train {
  epochs = 15
  batch = 64
  optimizer = sgd(lr=0.1, momentum=0.9, nesterov=true, weight_decay=5e-4)
  schedule = cosine
  seed = 0
}

node student : cnn_tiny [target]

label -> student : through
