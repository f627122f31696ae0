# digits_crd.kt: crd.kt on 8x8 digits, minutes on a CPU: contrastive representation
# distillation (Tian et al. 2020, Contrastive Representation Distillation, ICLR). A
# WideResNet-16-2 teacher (pre-trained on labels, frozen) teaches a ResNet20 student through
# their pooled features, each contrasted with 512 other training images' from the memory
# bank (digits keeps 637 training images beside 800 for validation, so the paper's 16384
# cannot be drawn), besides the labels.
graph digits_crd

data digits {
  augment = pad_crop
  pad = 1
  val_split = 800
}

train {
  epochs = 15
  batch = 64
  optimizer = sgd(lr=0.1, momentum=0.9, nesterov=true, weight_decay=5e-4)
  schedule = cosine
  seed = 0
}

node student : resnet20 [target]
node teacher : wrn16_2  [frozen]  # pre-trained on labels by dclang (cached), never updated

label        -> student      : through
teacher.pool -> student.pool : through crd(feat_dim=128, nce_k=512, T=0.07, weight=0.8)
