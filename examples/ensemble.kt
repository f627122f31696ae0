# ensemble.kt: three ResNet32 peers taught by their own ensemble (KDCL / ONE-like, CIFAR-100).
# Each peer learns from the labels and from the mean of the three peers' logits at T = 3
# (Song & Chai's and ONE's on-the-fly teacher; Table 2 compares against both). The ensemble is a
# detached source: each peer changes only through its own loss, all three after the same
# forward pass (paper 3.4). The ensemble is the target, the deployed model: best.pt is chosen
# on its validation accuracy, and every peer's accuracy is reported beside it.
graph ensemble

data cifar100 {
  augment = pad_crop_flip
  val_split = 5000
}

train {
  epochs = 200
  batch = 64
  optimizer = sgd(lr=0.1, momentum=0.9, nesterov=true, weight_decay=5e-4)
  schedule = step(milestones=[60, 120, 180], gamma=0.1)
  seed = 0
}

node p1  : resnet32
node p2  : resnet32
node p3  : resnet32
node ens : ensemble(p1, p2, p3) [target]

label -> p1 : through
label -> p2 : through
label -> p3 : through
ens   -> p1 : through kl(T=3)
ens   -> p2 : through kl(T=3)
ens   -> p3 : through kl(T=3)
