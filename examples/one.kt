# one.kt: On-the-fly Native Ensemble (Lan, Zhu and Gong 2018, Knowledge Distillation by
# On-the-Fly Native Ensemble, NeurIPS) as a knowledge transfer graph. Three branches share
# a ResNet32's trunk (every module before `layer3`, one copy of its weights, computed once a
# step) and each has its own `layer3` and classifier. Their learned ensemble (one softmax
# weight per branch, trained from the labels with the branches' outputs detached, where ONE
# computes its gate per sample from the trunk's features) teaches every branch at T = 3.
# Any branch is deployed alone; the first is the target.
graph one

data cifar100 {
  augment = pad_crop_flip
  val_split = 5000
}

train {
  epochs = 300
  batch = 128
  optimizer = sgd(lr=0.1, momentum=0.9, weight_decay=5e-4)
  schedule = step(milestones=[150, 225], gamma=0.1)
  seed = 0
}

node b1  : resnet32                [target]
node b2  : branch(b1, from=layer3)
node b3  : branch(b1, from=layer3)
node ens : ensemble(b1, b2, b3)    [combine=learned]

label -> b1  : through
label -> b2  : through
label -> b3  : through
label -> ens : through
ens   -> b1  : through kl(T=3)
ens   -> b2  : through kl(T=3)
ens   -> b3  : through kl(T=3)
