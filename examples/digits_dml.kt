# digits_dml.kt: the quickstart's student with deep mutual learning only (paper Fig. 1b).
graph digits_dml

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

node student : cnn_tiny  [target]
node peer    : cnn_small

label   -> student : through
label   -> peer    : through
peer    -> student : through
student -> peer    : through
