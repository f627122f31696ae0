# unknown_augment.kt: an augmentation that does not exist
# expect: E209
graph unknown_augment
data cifar100 {
  augment = pad_crop_flop
  val_split = 5000
}
node a : resnet32 [target]
label -> a : through
