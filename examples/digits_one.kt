# digits_one.kt: one.kt on 8x8 digits, minutes on a CPU: On-the-fly Native Ensemble (Lan,
# Zhu and Gong 2018, NeurIPS). Three branches share a ResNet20's trunk (every module before
# `layer3`) and their learned ensemble teaches each at T = 3; the first branch is the target.
graph digits_one

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

node b1  : resnet20                [target]
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
