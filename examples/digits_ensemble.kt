# digits_ensemble.kt: three peers taught by their own ensemble (KDCL / ONE on a CPU, minutes).
# Each peer learns from the labels and from the mean of the three peers' logits (a detached
# source: the ensemble's edges update each peer only through its own loss). The ensemble is
# the target, the deployed model: best.pt is chosen on its validation accuracy.
graph digits_ensemble

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

node p1  : cnn_tiny
node p2  : cnn_tiny
node p3  : cnn_small
node ens : ensemble(p1, p2, p3) [target]

label -> p1 : through
label -> p2 : through
label -> p3 : through
ens   -> p1 : through kl(T=2)
ens   -> p2 : through kl(T=2)
ens   -> p3 : through kl(T=2)
