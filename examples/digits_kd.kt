# digits_kd.kt: the quickstart's student with knowledge distillation only (paper Fig. 1a).
graph digits_kd

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
node teacher : cnn_small [frozen]  # pre-trained on labels by dclang (cached), never updated

label   -> student : through
teacher -> student : through kl(T=2)
