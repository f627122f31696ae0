# library_not_installed.kt: a timm model where timm is not installed (the test hides it)
# expect: E220
graph library_not_installed

data cifar100 {
  val_split = 5000
}

node student : resnet32                   [target]
node peer    : timm.mobilenetv3_small_100

label -> student : through
label -> peer    : through
peer  -> student : through
