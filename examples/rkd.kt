# rkd.kt: relational knowledge distillation (Park et al. 2019, Relational Knowledge
# Distillation, CVPR) as a knowledge transfer graph. A WideResNet-40-2 teacher, pre-trained
# on labels and frozen, teaches a WideResNet-16-2 student the distances and angles between the
# batch's penultimate features (`pool`), besides the labels; `weight=25` with the default
# `distance=1, angle=2` is the paper's 25 and 50 for the two potentials, as in the
# CRD authors' CIFAR-100 benchmark of it (Tian et al. 2020), one of whose pairs this is.
graph rkd

data cifar100 {
  augment = pad_crop_flip
  val_split = 5000
}

train {
  epochs = 240
  batch = 64
  optimizer = sgd(lr=0.05, momentum=0.9, weight_decay=5e-4)
  schedule = step(milestones=[150, 180, 210], gamma=0.1)
  seed = 0
}

node student : wrn16_2 [target]
node teacher : wrn40_2 [frozen]  # pre-trained on labels (cached), never updated

label        -> student      : through
teacher.pool -> student.pool : through rkd(distance=1, angle=2, weight=25)
