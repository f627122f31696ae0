# dml2_resnet32.kt: deep mutual learning of two ResNet32, the two-node counterpart of
# examples/dml4.kt, for `dclang bench`: how a step's operations grow with the node count.
graph dml2_resnet32

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

edges * -> * : through  # every ordered pair, `label` included: 2 label edges + 2 KL edges
