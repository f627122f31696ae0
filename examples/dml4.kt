# dml4.kt: deep mutual learning of four ResNet32.
# Mirrors the 4-node "DML" row of Table 2 (4 x ResNet32: 72.76 ± 0.35 on CIFAR-100), which
# is also the "Fixed (Through Gate)" form of Table 3: every node learns from the labels and
# from every other node through a `through` gate.
graph dml4

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

node m1 : resnet32 [target]
node m2 : resnet32
node m3 : resnet32
node m4 : resnet32

edges * -> * : through  # every ordered pair, `label` included: 4 label edges + 12 KL edges
