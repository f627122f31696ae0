# dml2.kt: deep mutual learning (Zhang et al.) of two different networks.
# Mirrors the 2-node "DML" row of Table 2 (ResNet32 + ResNet110: 71.49 ± 0.24 on
# CIFAR-100) and Fig. 1b: both networks start untrained, each learns from the labels and
# from the other's output, and both are updated after the same forward pass (paper 3.4).
graph dml2

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

node m1 : resnet32  [target]
node m2 : resnet110

label -> m1 : through
label -> m2 : through
m2    -> m1 : through  # KL(p_m2 || p_m1), T = 1
m1    -> m2 : through
