# layer_spatial_mismatch.kt: attention maps of different resolutions cannot be compared
# expect: E321
graph layer_spatial_mismatch
data digits { val_split = 300 }
node student : resnet20 [target]
node teacher : wrn16_2 [frozen]
label -> student : through
teacher.layer2 -> student.layer3 : through at(p=2)
