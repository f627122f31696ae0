# ckpt_wrong_classes.kt: the checkpoint was trained for 10 classes, cifar100 has 100 (the test writes it)
# expect: E602
graph ckpt_wrong_classes
data cifar100 { val_split = 5000 }
node a : resnet20 [target]
node t : cnn_tiny [frozen, init="teacher.pt"]
label -> a : through
t     -> a : through kl(T=2)
