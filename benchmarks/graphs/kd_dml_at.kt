# kd_dml_at.kt: examples/kd_dml.kt plus attention transfer from the frozen teacher at its three
# stages: what edges between layers cost (`dclang bench` times it with and without them).
# Mirrors Fig. 3b, the 3-node graph found by search on CIFAR-100, and the 3-node "DCL"
# row of Table 2 (ResNet32, ResNet110, ResNet32*: 73.46 ± 0.42). The linear gate from the
# teacher starts near zero, so training begins like DML and turns into KD + DML (paper 4.2).
graph kd_dml_at

data cifar100 {
  augment = pad_crop_flip  # 4 px reflect pad, random 32x32 crop, horizontal flip
  val_split = 5000  # held out of train: search and model selection use it, never test
}

train {
  epochs = 200
  batch = 64
  optimizer = sgd(lr=0.1, momentum=0.9, nesterov=true, weight_decay=5e-4)
  schedule = step(milestones=[60, 120, 180], gamma=0.1)
  seed = 0
}

node student : resnet32  [target]
node peer    : resnet110
node teacher : resnet32  [frozen]  # pre-trained on labels only, then never updated

label          -> student        : through
label          -> peer           : through
teacher        -> student        : linear
peer           -> student        : correct
student        -> peer           : correct kl(T=2)
teacher.layer1 -> student.layer1 : through at(p=2, weight=500)
teacher.layer2 -> student.layer2 : through at(p=2, weight=500)
teacher.layer3 -> student.layer3 : through at(p=2, weight=500)
