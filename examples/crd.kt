# crd.kt: contrastive representation distillation (Tian et al. 2020, Contrastive
# Representation Distillation, ICLR) as a knowledge transfer graph. A WideResNet-40-2
# teacher, pre-trained on labels and frozen, teaches a WideResNet-16-2 student through its
# penultimate features (`pool`): each embedded into 128 numbers, the student's embedding of
# an image must pick the teacher's embedding of the same image out of 16384 others from a
# memory bank over the training set, and the reverse. `weight=0.8`, `nce_k=16384` and
# T = 0.07 are the paper's CIFAR-100 setting, with its KD term (T = 4) kept.
graph crd

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
teacher      -> student      : through kl(T=4)
teacher.pool -> student.pool : through crd(feat_dim=128, nce_k=16384, T=0.07, weight=0.8)
