# layer_unknown.kt: a layer the model does not have
# expect: E230
graph layer_unknown
data digits { val_split = 300 }
node student : resnet20 [target]
node teacher : wrn16_2 [frozen]
label -> student : through
teacher.layer3 -> student.layr3 : through at(p=2)
