# kdcl.kt: Knowledge Distillation via Collaborative Learning (Guo et al. 2020, Online
# Knowledge Distillation via Collaborative Learning, CVPR), its naive variant, as a knowledge
# transfer graph. Two peers of different sizes each see their own random augmentation of
# every image; the mean of their logits, a soft target more robust than either peer's, teaches
# both at T = 2, besides the labels. The smaller peer is the target.
graph kdcl

data cifar100 {
  augment = pad_crop_flip
  val_split = 5000
}

train {
  epochs = 300
  batch = 128
  optimizer = sgd(lr=0.1, momentum=0.9, nesterov=true, weight_decay=5e-4)
  schedule = step(milestones=[150, 225], gamma=0.1)
  seed = 0
}

node a   : resnet32       [target, view=own]
node b   : resnet110      [view=own]
node ens : ensemble(a, b)

label -> a : through
label -> b : through
ens   -> a : through kl(T=2)
ens   -> b : through kl(T=2)
