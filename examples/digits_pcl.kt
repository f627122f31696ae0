# digits_pcl.kt: pcl.kt on 8x8 digits, minutes on a CPU: Peer Collaborative Learning (Wu and
# Gong 2021, AAAI). Three ResNet20 peers on their own augmentations are taught by their mean
# and by each other's mean teachers (moving averages, decay 0.9); the first peer's mean
# teacher is the target.
graph digits_pcl

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

node p1  : resnet20             [view=own]
node p2  : resnet20             [view=own]
node p3  : resnet20             [view=own]
node ens : ensemble(p1, p2, p3)
node m1  : ema(p1, decay=0.9)   [target]
node m2  : ema(p2, decay=0.9)
node m3  : ema(p3, decay=0.9)

label -> p1 : through
label -> p2 : through
label -> p3 : through
ens   -> p1 : through kl(T=3)
ens   -> p2 : through kl(T=3)
ens   -> p3 : through kl(T=3)
m2    -> p1 : through kl(T=3)
m3    -> p1 : through kl(T=3)
m1    -> p2 : through kl(T=3)
m3    -> p2 : through kl(T=3)
m1    -> p3 : through kl(T=3)
m2    -> p3 : through kl(T=3)
