# single.kt: one ResNet32 trained on labels only, the paper's baseline.
# Mirrors Table 1 ("individual learning", ResNet32: 70.71 ± 0.39 on CIFAR-100) and the
# 1-node row of Table 3. Training settings of section 4.1: SGD with Nesterov momentum 0.9,
# initial learning rate 0.1 divided by 10 every 60 epochs for 200 epochs, batch 64, and
# 4-pixel reflect padding, random crop and random flip.
graph single

data cifar100 {
  augment = pad_crop_flip  # 4 px reflect pad, random 32x32 crop, horizontal flip
  val_split = 5000  # held out of train for model selection, never the test set
}

train {
  epochs = 200
  batch = 64
  optimizer = sgd(lr=0.1, momentum=0.9, nesterov=true, weight_decay=5e-4)
  schedule = step(milestones=[60, 120, 180], gamma=0.1)
  seed = 0
}

node m1 : resnet32 [target]

label -> m1 : through  # cross-entropy with the labels (paper eq. 1)
