# search3.kt: the 3-node search template of section 3.5, as run for Fig. 3b.
# The target n1 is a ResNet32; search picks the models of n2 and n3 and the gate of every
# edge (label included) to maximise n1's validation accuracy, with ASHA pruning at epochs
# 1, 2, 4, ... A node whose incoming edges are all `cutoff` becomes a pre-trained, frozen
# teacher (paper 3.4). Search sites: n2.model, n3.model, and `S->T.gate` for each edge.
graph search3

data cifar100 {
  augment = pad_crop_flip
  val_split = 5000  # search scores trials on this split, never on the test set
}

train {
  epochs = 200
  batch = 64
  optimizer = sgd(lr=0.1, momentum=0.9, nesterov=true, weight_decay=5e-4)
  schedule = step(milestones=[60, 120, 180], gamma=0.1)
  seed = 0
}

node n1 : resnet32                             [target]
node n2 : choice(resnet32, resnet110, wrn28_2)
node n3 : choice(resnet32, resnet110, wrn28_2)

edges * -> * : choice(through, cutoff, linear, correct)  # every ordered pair, label included
