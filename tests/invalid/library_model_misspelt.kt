# library_model_misspelt.kt: a torchvision model name with a typo, and an unknown library
# expect: E200 E200
graph library_model_misspelt

data cifar100 {
  val_split = 5000
}

node student : resnet32             [target]
node teacher : torchvision.resnet81 [frozen]
node peer    : keras.resnet50

label   -> student : through
label   -> peer    : through
teacher -> student : through
peer    -> student : through
