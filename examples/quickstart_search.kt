# quickstart_search.kt: a 3-node search template small enough for a laptop CPU.
# The same shape as search3.kt (the search of section 3.5 behind Fig. 3b), on
# scikit-learn's 8x8 digits (offline) with small networks: a tiny target, two nodes whose
# model is searched, and a searched gate on every edge. 20 trials take a few minutes on
# two CPU cores.
graph quickstart_search

data digits {
  augment = pad_crop  # digits are not mirror-symmetric: no flip
  pad = 1
  val_split = 300  # search scores trials on these 300 images, never on the test set
}

train {
  epochs = 8
  batch = 64
  optimizer = sgd(lr=0.1, momentum=0.9, nesterov=true, weight_decay=5e-4)
  schedule = cosine(eta_min=0.0)
  seed = 0
}

node n1 : cnn_tiny                         [target]
node n2 : choice(cnn_tiny, cnn_small, mlp)
node n3 : choice(cnn_tiny, cnn_small, mlp)

edges * -> * : choice(through, cutoff, linear, correct)
